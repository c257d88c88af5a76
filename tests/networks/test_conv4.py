"""Conv-4 in 2D and 3D with every norm."""

from __future__ import annotations

import pytest
import torch

from medmeta.networks import Conv4, get_backbone


@pytest.mark.parametrize("norm", ["batch", "group", "instance"])
@pytest.mark.parametrize(("spatial_dims", "side"), [(2, 28), (3, 20)])
def test_output_shape_and_no_running_statistics(norm: str, spatial_dims: int, side: int) -> None:
    model = Conv4(in_channels=2, n_way=4, hidden_channels=8, spatial_dims=spatial_dims, norm=norm, image_size=side)
    out = model(torch.randn(3, 2, *(side,) * spatial_dims))
    assert out.shape == (3, 4)
    assert list(model.buffers()) == []  # batch statistics only: nothing leaks between tasks
    assert model.feature_dim == 8 * 2**spatial_dims  # 28 and 20 halve four times to 2 per axis (ceil)


def test_registry_and_bad_arguments() -> None:
    assert isinstance(get_backbone("conv4", n_way=3), Conv4)
    with pytest.raises(ValueError, match="unknown backbone"):
        get_backbone("resnet-1000")
    with pytest.raises(ValueError, match="unknown norm"):
        Conv4(norm="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spatial_dims"):
        Conv4(spatial_dims=1)
