"""The Label Studio bridge: people annotate the images a cycle selects (the ``labelstudio`` oracle).

- ``rle``: Label Studio's brush RLE, encoded and decoded with numpy;
- ``tasks``: the labelling config, image references and each task's pre-annotations;
- ``imports``: a Label Studio JSON export, checked against the cycle and decoded to label masks;
- ``handoff``: the files of an exported cycle, and the loop's hand-over and take-back of its query;
- ``server``: a cycle's project on a Label Studio server, through its API (``jobs.labelstudio``).
"""
