"""The U-Net keeps any input size, has the paper's widths, and fails clearly when too small."""
import pytest
import torch
from torch import nn

from dipnode.models.unet import UNet3d, UNetShapeError, activation_bytes, level_shapes, parameter_count


@pytest.mark.parametrize("upsample", ["transpose", "trilinear"])
@pytest.mark.parametrize("shape,depth", [((9, 13, 17), 2), ((5, 7, 11), 2), ((13, 17, 9), 4),
                                         ((5, 7, 11), 3), ((3, 1, 2), 1)])
def test_output_shape_equals_input_shape_for_odd_sizes(shape, depth, upsample):
    torch.manual_seed(0)
    net = UNet3d(base_channels=2, depth=depth, upsample=upsample).train()
    y = net(torch.rand(1, 1, *shape))
    assert y.shape == (1, 1) + shape
    assert torch.all(y >= 0)  # ReLU head: activity is non-negative


def test_same_factorisation_as_136x136x112_works():
    # 34 = 2·17 and 28 = 4·7: sides not multiples of 2^depth, like the paper's 136 = 8·17.
    net = UNet3d(base_channels=2, depth=4)
    x = torch.rand(1, 1, 28, 34, 34)
    assert net(x).shape == x.shape
    assert level_shapes((28, 34, 34), 4) == [(28, 34, 34), (14, 17, 17), (7, 9, 9), (4, 5, 5), (2, 3, 3)]


def test_paper_widths_16_32_64_128_and_256_bottleneck():
    net = UNet3d()
    assert net.widths == (16, 32, 64, 128, 256)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert max(c.out_channels for c in convs) == 256
    assert convs[0].in_channels == 1 and convs[0].out_channels == 16
    strided = [c for c in convs if c.stride == (2, 2, 2)]
    assert len(strided) == 4
    ups = [m for m in net.modules() if isinstance(m, nn.ConvTranspose3d)]
    assert [u.out_channels for u in ups] == [128, 64, 32, 16]
    head = net.head
    assert isinstance(head[0], nn.Conv3d) and head[0].kernel_size == (1, 1, 1)
    assert isinstance(head[1], nn.ReLU)
    assert sum(isinstance(m, nn.BatchNorm3d) for m in net.modules()) == 2 * 9 + 4


def test_every_parameter_gets_a_gradient():
    # Catches an unused layer, e.g. a skip that is built but never concatenated.
    net = UNet3d(base_channels=2, depth=3)
    net(torch.rand(1, 1, 9, 10, 11)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert parameter_count(net) == sum(p.numel() for p in net.parameters())


def test_too_small_volume_is_named_not_a_batchnorm_error():
    net = UNet3d(base_channels=2, depth=2)
    with pytest.raises(UNetShapeError, match=r"\(3, 4, 2\).*one voxel"):
        net(torch.rand(1, 1, 3, 4, 2))


def test_wrong_channels_raise():
    with pytest.raises(UNetShapeError, match="expected shape"):
        UNet3d(base_channels=2, depth=1)(torch.rand(1, 2, 4, 4, 4))


@pytest.mark.parametrize("kwargs,name", [({"upsample": "nearest"}, "upsample"), ({"depth": 0}, "depth"),
                                         ({"base_channels": 0}, "base_channels")])
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        UNet3d(**kwargs)


def test_activation_estimate_scales_with_voxels_and_width():
    small = activation_bytes((32, 32, 32), base_channels=16, depth=4)
    assert activation_bytes((64, 64, 64), base_channels=16, depth=4) == 8 * small
    assert activation_bytes((32, 32, 32), base_channels=32, depth=4) == 2 * small
    assert small > 32**3 * 16 * 4  # at least the first level's feature map
