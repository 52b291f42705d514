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
    assert isinstance(model.layer("head"), torch.nn.Conv2d) and model.layer("head").out_channels == 3
    assert model.layer("encoder.0") is model.encoder[0]
    with pytest.raises(KeyError, match="no layer 'decoder.9'"):
        model.layer("decoder.9")
    assert model.eval().embed(torch.randn(2, 3, 16, 16)).shape == (2, 4 * 2**3)


def test_skip_connections_carry_fine_detail():
    """A single-pixel input change at full resolution reaches the output at that pixel through the skip
    path even when the bottleneck is far coarser."""
    model = UNet(UNetConfig(num_classes=2, width=4, depth=3)).eval()
    x = torch.zeros(1, 3, 32, 32)
    y = x.clone()
    y[0, :, 20, 20] = 5.0
    diff = (model(y) - model(x)).abs().sum(1)[0]
    assert diff[20, 20] > 0 and diff[0, 0] == 0


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
