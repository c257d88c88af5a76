"""MONAI dictionary transforms: a deterministic, cached prefix and a random suffix per draw."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientation,
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    Spacingd,
)

from medmeta.data.formats import NIFTI, monai_readers
from medmeta.data.presets import DEFAULT_WINDOW, intensity_transform

KEY = "image"
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's RGB -> L: L = 0.299 R + 0.587 G + 0.114 B
DISPLAY_AXCODES = "LPI"  # a 2D NIfTI slice as a viewer shows it: x towards the patient's left, y posterior/inferior
_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


class NiftiDisplayPlaned(MapTransform):
    """2D: a NIfTI slice oriented as DICOM and viewers show it, then its singleton axis dropped.

    DICOM and PNG load as they show, ``[column, row]``; a NIfTI slice stores its voxels in any order
    (RAS for dcm2niix output), so it is reoriented by its affine to ``DISPLAY_AXCODES`` (``L``, ``P``,
    ``I``: the radiological display of an axial, coronal or sagittal slice, which DICOM's row and column
    axes give) and the axis of extent 1 is dropped, wherever it is stored (``X×Y×1``, ``1×Y×Z``,
    ``X×1×Z``). Other files pass unchanged.
    """

    def __init__(self, keys: str) -> None:
        super().__init__(keys)
        self.orient = Orientation(axcodes=DISPLAY_AXCODES, labels=_LABELS)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        out = dict(data)
        for key in self.key_iterator(out):
            image = out[key]
            if not (isinstance(image, MetaTensor) and NIFTI.matches(str(image.meta.get("filename_or_obj", "")))):
                continue
            while image.dim() > 4 and image.shape[-1] == 1:  # X×Y×1×1: the trailing axes beyond three
                image = image[..., 0]
            if image.dim() == 3:  # stored X×Y: one slice
                image = image[..., None]
            if image.dim() == 4 and 1 in image.shape[1:]:  # a volume is left to preflight's wrong-dims
                image = self.orient(image)
                image = image.squeeze(max(axis for axis in (1, 2, 3) if image.shape[axis] == 1))
            out[key] = image
        return out


class ConformImaged(MapTransform):
    """Bring a channel-first image to ``in_channels`` channels and ``spatial_dims`` dimensions.

    RGB becomes grayscale as PIL's ``convert("L")`` does it, ``L = 0.299 R + 0.587 G + 0.114 B``
    (ITU-R 601-2 luma, without PIL's rounding to integers); other channel counts by their mean.
    Grayscale becomes RGB by repetition. A 2D image stored with a trailing singleton axis (a
    NIfTI slice ``X×Y×1``) loses that axis.
    """

    def __init__(self, keys: str, *, in_channels: int, spatial_dims: int) -> None:
        super().__init__(keys)
        self.in_channels, self.spatial_dims = in_channels, spatial_dims

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        out = dict(data)
        for key in self.key_iterator(out):
            image = out[key]
            if not torch.is_floating_point(image):
                image = image.float()
            while image.dim() > self.spatial_dims + 1 and image.shape[-1] == 1:
                image = image[..., 0]
            channels = image.shape[0]
            if channels != self.in_channels:
                if self.in_channels == 1 and channels == 3:
                    weights = torch.tensor(LUMA_WEIGHTS, dtype=image.dtype, device=image.device)
                    image = (image * weights.view(3, *([1] * (image.dim() - 1)))).sum(dim=0, keepdim=True)
                elif self.in_channels == 1:
                    image = image.mean(dim=0, keepdim=True)
                elif channels == 1:
                    image = image.repeat(self.in_channels, *([1] * (image.dim() - 1)))
                else:
                    raise ValueError(f"cannot turn {channels} channels into {self.in_channels}")
            out[key] = image
        return out


def load_transforms(
    *,
    image_size: int,
    window: Sequence[float] | None = DEFAULT_WINDOW,
    preset: str | None = None,
    spatial_dims: int = 2,
    in_channels: int = 1,
    from_array: bool = False,
    array_channel_dim: int | str = "no_channel",
    spacing: Sequence[float] | None = None,
    roi_size: Sequence[int] | None = None,
) -> Compose:
    """Read (or take an array), conform, normalise intensity and resize one image; no metadata survives.

    Each file is read with its format's reader from the format table (``formats.FORMATS``): DICOM
    with a pydicom reader that keeps geometry only (no patient tags), NIfTI with MONAI's nibabel
    reader, PNG/JPEG with MONAI's PIL reader converting each image through its mode
    (``pictures.convert_picture``, as preflight does); ``EnsureTyped(track_meta=False)`` drops
    whatever metadata remains, so cached tensors carry no header value at all. In 2D a NIfTI slice
    is oriented as DICOM shows it (:class:`NiftiDisplayPlaned`); in 3D every file is oriented to RAS.

    Args:
        image_size: side length after resizing.
        window: ``(low, high)`` intensity window (HU for CT) mapped to ``[0, 1]`` with clipping;
            ``None`` rescales each image's own min/max to ``[0, 1]``.
        preset: a named intensity preset (see ``medmeta.data.presets``), overriding ``window``.
        spatial_dims: 2 or 3.
        in_channels: channels of the result.
        from_array: inputs are arrays already (MedMNIST), not file names.
        array_channel_dim: where array inputs keep their channels (``"no_channel"`` or ``-1``).
        spacing: 3D only: resample to this voxel spacing (mm) after orienting to RAS.
        roi_size: 3D only: centre crop / pad to this size before resizing.
    """
    steps: list = []
    if from_array:
        steps.append(EnsureChannelFirstd(KEY, channel_dim=array_channel_dim))
    else:
        load = LoadImaged(KEY, image_only=True)  # picks a reader by suffix: nibabel, PIL, ...
        for reader in monai_readers():  # ... the format table's first: DICOM, PNG/JPEG converted through their mode
            load.register(reader)
        steps += [load, EnsureChannelFirstd(KEY)]
        if spatial_dims == 2:
            steps.append(NiftiDisplayPlaned(KEY))
    steps.append(ConformImaged(KEY, in_channels=in_channels, spatial_dims=spatial_dims))
    if spatial_dims == 3:
        if not from_array:
            steps.append(Orientationd(KEY, axcodes="RAS", labels=_LABELS))
        if spacing is not None:
            steps.append(Spacingd(KEY, pixdim=tuple(spacing), mode="bilinear"))
        if roi_size is not None:
            steps.append(ResizeWithPadOrCropd(KEY, spatial_size=tuple(roi_size), mode="edge"))
    steps += [
        intensity_transform(KEY, preset=preset, window=window),
        Resized(KEY, spatial_size=(image_size,) * spatial_dims, mode="area"),
        EnsureTyped(KEY, dtype=torch.float32, track_meta=False),
    ]
    return Compose(steps)


def augment_images(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Label-preserving random flips along every spatial axis and 90° in-plane rotations, per image.

    Vectorised over the whole stack ``[B, C, *spatial]`` (MONAI's ``RandFlipd``/``RandRotate90d``
    work image by image, which made augmentation the slowest part of episode assembly); every
    draw comes from ``generator``, so an episode's augmentation is a function of its seed.
    """
    out = images.clone()
    n, spatial = images.shape[0], images.dim() - 2
    for axis in range(spatial):
        flip = torch.rand(n, generator=generator) < 0.5
        out[flip] = out[flip].flip(2 + axis)
    turns = torch.randint(0, 4, (n,), generator=generator)
    if images.shape[2] == images.shape[3]:  # square in-plane: a quarter turn keeps the shape
        for k in (1, 2, 3):
            chosen = turns == k
            out[chosen] = torch.rot90(out[chosen], k, dims=(2, 3))
    return out
