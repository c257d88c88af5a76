"""The image readers under their old import path: DICOM lives in ``dicom.py``, PNG/JPEG in ``pictures.py``.

Kept so ``from medmeta.data.readers import read_dicom`` (notebooks, user code) keeps working; new
code imports from the format's own module, and the format table is ``formats.py``.
"""

from medmeta.data.dicom import (
    DICOM_SUFFIXES,
    DecoderMissingError,
    DicomImage,
    DicomReadError,
    DicomSeriesError,
    DicomTruncatedError,
    MedmetaDicomReader,
    load_dicom,
    read_dicom,
)
from medmeta.data.pictures import MedmetaPictureReader, convert_picture, read_picture

__all__ = [
    "DICOM_SUFFIXES", "DecoderMissingError", "DicomImage", "DicomReadError", "DicomSeriesError", "DicomTruncatedError",
    "MedmetaDicomReader", "MedmetaPictureReader", "convert_picture", "load_dicom", "read_dicom", "read_picture",
]  # fmt: skip
