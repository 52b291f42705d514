import pytest
import torch

from segxal.models.unet import UNet, UNetConfig


@pytest.mark.parametrize("size", [(32, 64), (37, 50), (8, 8)])
def test_logits_have_input_size(size):
    model = UNet(UNetConfig(num_classes=5, width=4, depth=3)).eval()
    logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 5, *size)


def test_layers_by_name_and_embedding():
    model = UNet(UNetConfig(num_classes=3, width=4, depth=3))
    assert model.last_decoder_layer == "decoder.2"
    assert (
        isinstance(model.layer("head"), torch.nn.Conv2d) and model.layer("head").out_channels == 3
    )
    assert model.layer("encoder.0") is model.encoder[0]
    with pytest.raises(KeyError, match="no layer 'decoder.9'"):
        model.layer("decoder.9")
    assert model.eval().embed(torch.randn(2, 3, 16, 16)).shape == (2, 4 * 2**3)


def test_skip_connections_feed_each_decoder_block():
    """Each decoder block sees [upsampled deeper features, the encoder output at its resolution]."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(num_classes=2, width=4, depth=3)).eval()
    seen = {}
    for level in range(3):
        model.encoder[level].register_forward_hook(
            lambda m, i, o, level=level: seen.__setitem__(("enc", level), o)
        )
        model.decoder[2 - level].register_forward_hook(
            lambda m, i, o, level=level: seen.__setitem__(("dec", level), i[0])
        )
    model(torch.randn(1, 3, 32, 32))
    for level in range(3):
        skip = seen[("enc", level)]
        assert torch.equal(seen[("dec", level)][:, skip.shape[1] :], skip)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = UNet(UNetConfig(num_classes=4, width=4, depth=2)).eval()
    torch.save(model.to_checkpoint(), tmp_path / "m.pt")
    restored = UNet.from_checkpoint(torch.load(tmp_path / "m.pt", weights_only=True)).eval()
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(model(x), restored(x))
    assert restored.config == model.config


def test_bad_config():
    with pytest.raises(ValueError, match="num_classes"):
        UNetConfig(num_classes=0)
