"""PNG (RGB), JPEG (grayscale) and 2D NIfTI images in one folder, to the configured channel count."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medmeta.data.datamodule import EpisodicDataModule
from medmeta.data.loading import transform_images
from medmeta.data.records import ImageRecord
from medmeta.errors import DataError


def _mixed_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c, kind in enumerate(["png-rgb", "png-rgb", "jpeg", "nifti"]):
        for p in range(3):
            folder = root / f"class_{kind}_{c}" / f"patient{c}{p}"  # a folder name is a patient, across classes
            folder.mkdir(parents=True)
            for k in range(2):
                pixels = rng.integers(0, 255, size=(20, 20, 3) if kind == "png-rgb" else (20, 20), dtype=np.uint8)
                if kind == "png-rgb":
                    Image.fromarray(pixels, "RGB").save(folder / f"{k}.png")
                elif kind == "jpeg":
                    Image.fromarray(pixels, "L").save(folder / f"{k}.jpg")
                else:
                    nib.save(nib.Nifti1Image(pixels[..., None].astype(np.int16), np.eye(4)), folder / f"{k}.nii.gz")
    return root


@pytest.mark.parametrize("in_channels", [1, 3])
def test_mixed_formats_become_episodes_with_the_configured_channels(tmp_path: Path, in_channels: int) -> None:
    root = _mixed_folder(tmp_path / "mixed")
    data = EpisodicDataModule(
        str(root), n_way=4, k_shot=1, q_query=2, in_channels=in_channels, image_size=16, preset="photo",
        splits={"test": sorted(p.name for p in root.iterdir())}, test_episodes=2, eval_batch_size=2,
    )  # fmt: skip
    data.setup("test")
    assert data.inventory is not None and not data.inventory.problems
    assert len({r.patient for r in data.inventory.records}) == 12  # patients from the sub-folders
    batch = next(iter(data.test_dataloader()))
    assert batch["support_x"].shape == (2, 4, in_channels, 16, 16)
    assert float(batch["query_x"].min()) >= 0.0 and float(batch["query_x"].max()) <= 1.0


# --- images read as they show, not as they store (palette, CMYK, alpha, 1-bit, 16-bit) ---

def _grey(size: int = 24) -> np.ndarray:
    """A smooth 8-bit grey image (JPEG keeps it within a few levels) with some texture."""
    y, x = np.mgrid[0:size, 0:size]
    texture = np.random.default_rng(1).integers(0, 40, (size, size))
    return (20 + 6 * x + 3 * y + texture).clip(0, 255).astype(np.uint8)


def _colour(size: int = 24) -> np.ndarray:
    grey = _grey(size).astype(int)
    return np.stack([grey, 255 - grey, (grey * 3) % 256], axis=-1).astype(np.uint8)


def _alpha(size: int = 24) -> np.ndarray:
    alpha = np.tile(np.linspace(0, 255, size), (size, 1)).astype(np.uint8)
    alpha[:, :4] = 0  # fully transparent strip: shows black
    return alpha


def _write(kind: str, path: Path) -> Path:
    """Write one picture of `kind` to `path` with PIL."""
    if kind == "palette-colour":
        Image.fromarray(_colour()).quantize(colors=32).save(path)
    elif kind == "palette-grey":
        Image.fromarray(_grey()).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path)
    elif kind == "palette-transparent":
        image = Image.fromarray(_colour()).quantize(colors=16)
        image.save(path, transparency=int(np.asarray(image)[0, 0]))
    elif kind == "rgba":
        Image.fromarray(np.dstack([_colour(), _alpha()]), "RGBA").save(path)
    elif kind == "la":
        Image.fromarray(np.dstack([_grey(), _alpha()]), "LA").save(path)
    elif kind == "cmyk-jpeg":
        Image.fromarray(_colour()).convert("CMYK").save(path, quality=95)
    elif kind == "bilevel":
        Image.fromarray(_grey() > 100).save(path)
    else:
        raise ValueError(kind)
    return path


# kind, file name, stored mode, shown mode: what the file shows is PIL's conversion to this mode
PICTURES = [
    ("palette-colour", "p.png", "P", "RGB"),
    ("palette-grey", "p.png", "P", "L"),
    ("palette-transparent", "p.png", "P", "RGB"),
    ("rgba", "a.png", "RGBA", "RGB"),
    ("la", "a.png", "LA", "L"),
    ("cmyk-jpeg", "c.jpg", "CMYK", "RGB"),
    ("bilevel", "b.png", "1", "L"),
]


def _shown(path: Path, mode: str) -> np.ndarray:
    """PIL's own conversion to `mode`; an alpha channel composited on black first."""
    with Image.open(path) as image:
        if image.mode in ("RGBA", "LA") or "transparency" in image.info:
            black = Image.new("RGBA", image.size, (0, 0, 0, 255))
            image = Image.alpha_composite(black, image.convert("RGBA"))
        return np.asarray(image.convert(mode))


@pytest.mark.parametrize(("kind", "name", "stored", "shown"), PICTURES, ids=[p[0] for p in PICTURES])
def test_pictures_are_read_as_pil_shows_them(tmp_path: Path, kind: str, name: str, stored: str, shown: str) -> None:
    from medmeta.data.pictures import read_picture

    path = _write(kind, tmp_path / name)
    assert Image.open(path).mode == stored
    np.testing.assert_array_equal(read_picture(path), _shown(path, shown))


@pytest.mark.parametrize(("kind", "name", "stored", "shown"), PICTURES, ids=[p[0] for p in PICTURES])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_training_reads_pictures_as_pil_shows_them(tmp_path: Path, kind: str, name: str, stored: str, shown: str,
                                                    in_channels: int) -> None:
    path = _write(kind, tmp_path / name)
    record = ImageRecord(path, "a", "p")
    images = transform_images([record], image_size=24, window=(0, 255), preset=None, spatial_dims=2,
                              in_channels=in_channels)  # fmt: skip
    # PIL's L is 0.299 R + 0.587 G + 0.114 B rounded to integers; training keeps the fraction
    expected = _shown(path, "L" if in_channels == 1 else "RGB").astype(np.float32) / 255
    expected = expected[None] if in_channels == 1 else np.moveaxis(expected, -1, 0)  # grey shown: L repeated
    np.testing.assert_allclose(images[0].numpy(), np.swapaxes(expected, 1, 2), atol=0.51 / 255)  # [C, cols, rows]


def test_alpha_is_composited_on_black(tmp_path: Path) -> None:
    from medmeta.data.pictures import read_picture

    rgb = read_picture(_write("rgba", tmp_path / "a.png")).astype(float)
    expected = _colour().astype(float) * _alpha()[..., None] / 255  # premultiplied: black where transparent
    assert np.abs(rgb - expected).max() <= 1.0 and (rgb[:, :4] == 0).all()


def test_cmyk_jpeg_is_not_inverted(tmp_path: Path) -> None:
    grey = _grey()
    Image.fromarray(grey).save(tmp_path / "twin.jpg", quality=95)
    Image.fromarray(grey).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    records = [ImageRecord(tmp_path / "twin.jpg", "a", "p"), ImageRecord(tmp_path / "cmyk.jpg", "a", "p")]
    twin, cmyk = transform_images(records, image_size=24, window=(0, 255), preset=None, spatial_dims=2, in_channels=1)
    correlation = np.corrcoef(twin.flatten().numpy(), cmyk.flatten().numpy())[0, 1]
    assert correlation > 0.99, correlation
    assert float((twin - cmyk).abs().mean()) < 3 / 255


def _with_16bit_pngs(root: Path) -> tuple[Path, list[Path]]:
    """Six classes of 8-bit grey PNGs, plus two 16-bit PNGs (values 20000..30000) in one class."""
    rng = np.random.default_rng(0)
    for c in range(6):
        for p in range(3):
            folder = root / f"class{c}" / f"patient{p}"
            folder.mkdir(parents=True)
            for k in range(2):
                Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(folder / f"{k}.png")
    wide = [root / "class0" / "patient0" / "wide.png", root / "class0" / "patient1" / "wide.png"]
    for path in wide:
        Image.fromarray(rng.integers(20000, 30000, (12, 12)).astype(np.uint16)).save(path)
        assert Image.open(path).mode == "I;16"
    return root, wide


def test_16bit_png_constant_under_the_ct_window_is_reported_and_not_trained_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medmeta.cli import main

    root, wide = _with_16bit_pngs(tmp_path / "data")
    check = ["data", "check", str(root), "--n-way", "2", "--q-query", "1", "--split-ratios", "0.34", "0.33", "0.33",
             "--json"]  # fmt: skip
    assert main(check) == 0  # the default window, as fit's: [-1100, 400]
    report = json.loads(capsys.readouterr().out)
    skipped = {Path(s["path"]): s["reason"] for s in report["skipped"]}
    assert skipped == {path: "constant-after-window" for path in wide} and report["usable_images"] == 36
    assert main([*check, "--window", "0", "65535"]) == 0 and json.loads(capsys.readouterr().out)["skipped"] == []
    assert main([*check, "--preset", "xray"]) == 0 and json.loads(capsys.readouterr().out)["usable_images"] == 38
    data = EpisodicDataModule(str(root), n_way=2, k_shot=1, q_query=1, image_size=12,
                              splits={"test": ["class0", "class1"]}, test_episodes=2, eval_batch_size=2)  # fmt: skip
    data.setup("test")
    assert data.inventory is not None and {r.path for r in data.inventory.records}.isdisjoint(wide)
    assert [p.code for p in data.inventory.problems] == ["constant-after-window"] * 2


def test_data_check_takes_a_window_as_fit_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medmeta.cli import main

    root, _ = _with_16bit_pngs(tmp_path / "data")
    check = ["data", "check", str(root), "--n-way", "2", "--q-query", "1", "--split-ratios", "0.34", "0.33", "0.33"]
    assert main([*check, "--window", "none", "--json"]) == 0  # per-image min/max, as --data.window null
    assert json.loads(capsys.readouterr().out)["usable_images"] == 38
    for bad in (["--window", "400", "-1100"], ["--window", "low", "high"], ["--preset", "ct-nose"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*check, *bad])
        assert exit_info.value.code == 2 and "Traceback" not in capsys.readouterr().err


# --- one CSV manifest mixing DICOM, NIfTI and PNG: every format loaded, pixel values intact ---

def _mixed_manifest(folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A manifest of 3 classes x (one DICOM, one NIfTI, one PNG) 16x16 image, each of its own patient, and the image
    each file must become in MONAI's ``[x, y]`` = ``[column, row]`` axes, in the 0..255 units of every source."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(7)
    expected: dict[str, np.ndarray] = {}
    rows = ["path,label,patient_id"]
    for c, label in enumerate(["cyst", "nodule", "mass"]):
        values = [rng.integers(0, 256, (16, 16)) for _ in range(3)]  # [row, col], all asymmetric
        dicom, nifti, png = f"dcm/{label}.dcm", f"nii/{label}.nii.gz", f"png/{label}.png"
        for name in (dicom, nifti, png):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta, ds.Modality = meta, "CT"
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Rows, ds.Columns, ds.PixelSpacing = 16, 16, [0.5, 0.5]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0  # stored 1024 + v is v HU
        ds.PixelData = (values[0] + 1024).astype("<u2").tobytes()
        ds.save_as(folder / dicom, enforce_file_format=True)
        nib.save(nib.Nifti1Image(values[1].astype(np.int16), np.eye(4)), folder / nifti)  # stored as [x, y] already
        Image.fromarray(values[2].astype(np.uint8), "L").save(folder / png)
        # an identity affine is RAS: shown as DICOM shows a slice (x towards the patient's left, y posterior), flipped
        expected |= {dicom: values[0].T, nifti: values[1][::-1, ::-1], png: values[2].T}
        rows += [f"{dicom},{label},d{c}", f"{nifti},{label},n{c}", f"{png},{label},p{c}"]
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv", expected


def test_one_manifest_loads_dicom_nifti_and_png_with_their_pixel_values(tmp_path: Path) -> None:
    from collections import Counter

    from medmeta.data.inventory import take_inventory

    manifest, expected = _mixed_manifest(tmp_path / "site")
    inventory = take_inventory(manifest, n_way=3, k_shot=1, q_query=2, splits={"test": ["cyst", "nodule", "mass"]},
                               window=(0.0, 255.0))  # fmt: skip
    assert not inventory.problems
    assert Counter("".join(r.path.suffixes) for r in inventory.records) == {".dcm": 3, ".nii.gz": 3, ".png": 3}
    assert inventory.classes() == {label: (3, 3) for label in ("cyst", "nodule", "mass")}
    images = transform_images(inventory.records, image_size=16, window=(0.0, 255.0), preset=None, spatial_dims=2,
                              in_channels=1)  # fmt: skip
    assert images.shape == (9, 1, 16, 16)
    for record, image in zip(inventory.records, images, strict=True):
        name = record.path.relative_to(manifest.parent).as_posix()
        np.testing.assert_allclose(image[0].numpy(), expected[name] / 255.0, atol=1e-6, err_msg=name)


# The format table (medmeta/data/formats.py) drives discovery, preflight and the load transforms.


def test_every_format_s_suffixes_are_image_suffixes_and_no_suffix_has_two_formats() -> None:
    from medmeta.data import formats, records

    suffixes = [s for fmt in formats.FORMATS for s in fmt.suffixes]
    assert formats.IMAGE_SUFFIXES == tuple(suffixes) == records.IMAGE_SUFFIXES
    assert len(set(suffixes)) == len(suffixes) and all(s.startswith(".") and s == s.lower() for s in suffixes)
    assert (formats.DICOM_SUFFIXES, formats.NIFTI_SUFFIXES, formats.PICTURE_SUFFIXES) == tuple(
        fmt.suffixes for fmt in formats.FORMATS
    )
    assert formats.format_of(Path("a/B.NII.GZ")) is formats.NIFTI and formats.format_of(Path("x.txt")) is None
    assert formats.series_format() is formats.DICOM


def test_the_table_s_readers_are_registered_with_dicom_tried_first() -> None:
    from monai.transforms import LoadImaged

    from medmeta.data.dicom import MedmetaDicomReader
    from medmeta.data.pictures import MedmetaPictureReader
    from medmeta.data.transforms import load_transforms

    load = next(t for t in load_transforms(image_size=8).transforms if isinstance(t, LoadImaged))
    ours = [type(r) for r in load._loader.readers if type(r) in (MedmetaDicomReader, MedmetaPictureReader)]
    assert ours == [MedmetaPictureReader, MedmetaDicomReader]  # LoadImage tries the last registered first


def _npy_format() -> object:
    from monai.data import NumpyReader

    from medmeta.data.format_spec import ImageFormat, ReadProblem

    def check(path: Path) -> tuple[np.ndarray, int, int]:
        try:
            array = np.load(path)
        except ValueError as err:
            raise ReadProblem("unreadable", "not a NumPy array file") from err
        return array, array.ndim, 1

    return ImageFormat("NumPy", (".npy",), check=check, reader=NumpyReader)


def test_one_table_entry_adds_a_format_to_discovery_preflight_and_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medmeta.data import formats
    from medmeta.data.inventory import take_inventory
    from medmeta.data.preflight import check_image

    root, rng = tmp_path / "npy", np.random.default_rng(0)
    for c in range(4):
        for p in range(3):
            (root / f"class{c}" / f"p{p}").mkdir(parents=True)
            for k in range(2):
                np.save(root / f"class{c}" / f"p{p}" / f"{k}.npy", rng.random((10, 10)).astype(np.float32))
    (root / "class0" / "p0" / "broken.npy").write_bytes(b"no array here")
    with pytest.raises(DataError, match="no images found"):
        take_inventory(root, n_way=2, k_shot=1, q_query=1)  # .npy is no format yet
    monkeypatch.setattr(formats, "FORMATS", (*formats.FORMATS, _npy_format()))
    assert check_image(root / "class1" / "p0" / "0.npy") is None
    inventory = take_inventory(root, n_way=2, k_shot=1, q_query=1, split_ratios=(0.5, 0.25, 0.25), window=(0.0, 1.0))
    assert len(inventory.records) == 24 and [p.reason for p in inventory.problems] == ["unreadable"]
    images = transform_images(inventory.records, image_size=8, window=(0.0, 1.0), preset=None, spatial_dims=2,
                              in_channels=1)  # fmt: skip
    assert images.shape == (24, 1, 8, 8) and float(images.std()) > 0
