"""The plane of an image tensor that medmeta's figures draw, laid out as a viewer shows it (rows down, columns across).

medmeta's tensors keep the axis order of whatever produced them, and the two sources differ:

- files (DICOM, NIfTI, PNG/JPEG) are read by MONAI's readers, which reverse numpy's axis order: a 2D
  image is ``[C, x, y]`` (``x`` the column, ``y`` the row), and a 3D volume, oriented to RAS by
  the load transforms, is ``[C, R, A, S]`` (patient's right, anterior, superior);
- arrays (MedMNIST ``.npz``) keep numpy's order: ``[C, row, column]`` and ``[C, D, row, column]``.

Every figure of an image, and every map drawn over one (Grad-CAM has its image's spatial shape),
goes through :func:`display_plane`, so figure and map stay aligned.
"""

from __future__ import annotations

from torch import Tensor


def display_plane(image: Tensor, *, from_array: bool = False) -> Tensor:
    """The plane of ``image`` (``[C, *spatial]``, 2D or 3D) a viewer shows, as ``[C, rows, columns]``.

    A 2D image read from a file is transposed (rows = ``y``). A 3D volume read from a file shows
    its middle axial slice (along S) in the radiological convention: anterior up, the patient's
    left on the image's right. An array image (``from_array``, MedMNIST) is drawn as stored; a 3D
    array shows its middle slice along ``D``.
    """
    if image.dim() not in (3, 4):
        raise ValueError(f"an image to draw must be [C, H, W] or [C, D, H, W], got {tuple(image.shape)}")
    if from_array:
        return image[:, image.shape[1] // 2] if image.dim() == 4 else image
    if image.dim() == 4:  # [C, R, A, S] -> the middle axial slice [C, L, P] (R and A reversed)
        image = image[..., image.shape[3] // 2].flip(1, 2)
    return image.transpose(1, 2)
