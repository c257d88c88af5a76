"""Grad-CAM saliency maps for few-shot predictions, and PNG renderings of images and overlays.

:func:`grad_cam` wraps MONAI's :class:`monai.visualize.GradCAM` and undoes its side effects on the
model: MONAI registers forward and backward hooks it never removes, zeroes every parameter's
``.grad``, flips the map (its default normaliser maps max to 0) and toggles train/eval mode. Here
hooks, gradients, ``requires_grad`` flags and train/eval modes are restored afterwards, and each
map is min-max scaled to [0, 1] with 1 the most salient location.

PNGs carry pixels only (no axes, no padding): their size is the image's size times ``scale``. An
image and its map are drawn as a viewer shows them (:func:`medmeta.display.display_plane`: in 3D
the middle axial slice, anterior up, the patient's left on the right). A title goes into the PNG's
text metadata, never into the pixels. Callers name files and titles by
an opaque case id, never by a patient identifier or a source path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from monai.visualize import GradCAM
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor, nn

from medmeta.display import display_plane
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks")


@contextmanager
def _model_state_guard(model: nn.Module) -> Iterator[None]:
    """Restore hooks, train/eval modes, ``requires_grad``, ``.grad`` and ``inplace`` flags on exit."""
    modules = list(model.modules())
    hooks = [{name: set(getattr(m, name, {})) for name in _HOOK_DICTS} for m in modules]
    full_backward = [m._is_full_backward_hook for m in modules]
    training = [m.training for m in modules]
    inplace = [m.__dict__.get("inplace") for m in modules]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    requires_grad = [p.requires_grad for p in params]
    try:
        for p in params:  # gradients are needed for activations only, never for parameters
            p.requires_grad_(False)
        yield
    finally:
        for m, before, was_full, was_training, was_inplace in zip(modules, hooks, full_backward, training, inplace):
            for name, keys in before.items():
                registry = getattr(m, name, None)
                if registry is not None:
                    for key in [k for k in registry if k not in keys]:
                        del registry[key]
            m._is_full_backward_hook = was_full
            m.training = was_training
            if was_inplace is not None:
                m.__dict__["inplace"] = was_inplace
        for p, grad, req in zip(params, grads, requires_grad):
            p.requires_grad_(req)
            p.grad = grad


def _normalise_per_image(maps: Tensor) -> Tensor:
    """Min-max scale each map of ``[B, 1, *spatial]`` to [0, 1]; constant or non-finite maps become 0."""
    flat = torch.nan_to_num(maps.flatten(1), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = high - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return scaled.clamp(0.0, 1.0).view_as(maps)


def grad_cam(model: nn.Module, images: Tensor, class_idx: Tensor, target_layer: str) -> Tensor:
    """Grad-CAM maps ``[B, 1, *spatial]`` in [0, 1] of ``images`` ``[B, C, *spatial]`` for each image's class.

    The whole batch goes through the model in every call (medmeta's batch norm uses batch
    statistics), once per distinct class in ``class_idx``; image ``i`` takes its map from the call
    for ``class_idx[i]``. With transductive batch norm the gradient of a class score summed over
    the batch includes small cross-image terms. MONAI runs the forwards in eval mode. The model's
    parameters, their ``.grad``, its hooks and its train/eval modes are left as they were.

    Args:
        model: classifier returning logits ``[B, n_classes]``.
        images: ``[B, C, H, W]`` or ``[B, C, D, H, W]``.
        class_idx: ``[B]`` integer class per image (e.g. the predicted class).
        target_layer: name of a submodule in ``model.named_modules()`` (e.g. ``"features.14"``, the
            ReLU after the last convolution of a four-block backbone).
    """
    if images.dim() not in (4, 5):
        raise ValueError(f"images must be [B, C, H, W] or [B, C, D, H, W], got {tuple(images.shape)}")
    class_idx = torch.as_tensor(class_idx).reshape(-1).long().cpu()
    if class_idx.numel() != images.shape[0]:
        raise ValueError(f"need one class index per image: {class_idx.numel()} for {images.shape[0]} images")
    if target_layer not in dict(model.named_modules()):
        raise ValueError(f"target layer {target_layer!r} is not a submodule of {type(model).__name__}")
    x = images.detach().clone().float().requires_grad_(True)
    out = torch.zeros(images.shape[0], 1, *images.shape[2:], device=images.device)
    with _model_state_guard(model), torch.enable_grad():
        cam = GradCAM(nn_module=model, target_layers=target_layer, postprocessing=lambda m: m)
        for c in class_idx.unique().tolist():
            rows = (class_idx == c).nonzero().flatten().to(images.device)
            maps = cam(x=x, class_idx=int(c)).detach().float()
            out[rows] = maps[rows]
        del cam
    return _normalise_per_image(out)


def _grey_plane(t: Tensor, what: str, from_array: bool) -> np.ndarray:
    """The channel mean of the plane a viewer shows (:func:`display_plane`) of ``[H, W]``, ``[C, H, W]`` or
    ``[C, D, H, W]``, as a ``[rows, columns]`` array in [0, 1]."""
    t = t.detach().float().cpu()
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() not in (3, 4):
        raise ValueError(f"{what} must be [H, W], [C, H, W] or [C, D, H, W], got {tuple(t.shape)}")
    plane = display_plane(t, from_array=from_array).mean(0)
    return torch.nan_to_num(plane, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0).numpy()


def _save_png(rgb: np.ndarray, path: Path, scale: int, title: str | None) -> Path:
    """Write a float RGB or grey array in [0, 1] as PNG, enlarged ``scale`` times by pixel repetition."""
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    pixels = np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    info = PngInfo()
    if title is not None:
        info.add_text("Title", title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG", pnginfo=info)
    return path


def image_png(image: Tensor, path: Path, scale: int = 1, *, from_array: bool = False) -> Path:
    """Write ``image`` (windowed to [0, 1]; ``[C, H, W]`` or ``[C, D, H, W]``) as a grey PNG, ``scale`` times its size.

    The image is drawn as a viewer shows it (:func:`~medmeta.display.display_plane`; 3D: the middle axial
    slice); ``from_array``: it came from an array source (MedMNIST), not a file.
    """
    return _save_png(_grey_plane(image, "image", from_array), path, scale, None)


def overlay_png(
    image: Tensor,
    cam: Tensor,
    path: Path,
    title: str | None = None,
    *,
    scale: int = 1,
    alpha: float = 0.4,
    colormap: str = "jet",
    from_array: bool = False,
) -> Path:
    """Write the grey ``image`` with ``cam`` as a semi-transparent colour overlay, ``scale*H x scale*W`` pixels.

    Args:
        image: ``[C, H, W]`` or ``[C, D, H, W]`` windowed to [0, 1], drawn as a viewer shows it
            (:func:`~medmeta.display.display_plane`; 3D: the middle axial slice, anterior up, the
            patient's left on the right).
        cam: map of the same spatial size, ``[1, *spatial]`` as returned per image by :func:`grad_cam`;
            drawn through the same plane, so it stays aligned with the image.
        path: output PNG file.
        title: stored in the PNG's text metadata (the pixels stay the image's size).
        scale: integer enlargement factor.
        alpha: opacity of the colour overlay.
        colormap: a matplotlib colormap name (``"jet"`` or ``"inferno"``).
        from_array: the image came from an array source (MedMNIST), not a file.
    """
    sizes = [tuple(t.shape if t.dim() == 2 else t.shape[1:]) for t in (image, cam)]
    if sizes[0] != sizes[1]:
        raise ValueError(f"image and cam sizes differ: {sizes[0]} vs {sizes[1]}")
    grey, heat = _grey_plane(image, "image", from_array), _grey_plane(cam, "cam", from_array)
    colour = colormaps[colormap](heat)[..., :3]
    rgb = (1.0 - alpha) * grey[..., None] + alpha * colour
    return _save_png(rgb, path, scale, title)
