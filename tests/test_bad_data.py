"""Bad data ends in a named ``DataError`` whose message names the file, never in a raw traceback from
wave / PIL / numpy / gzip / csv / torch (issue: faults and bad input).

Everything runs on tiny fake sources built here in tmp_path: AV-Digits (FSDD WAVs, MNIST IDX and
CSV, laid out as in shared/data) and the paper-dataset layout (audio/<clip>.wav,
visual/Image-01-FPS/<clip>/*.jpg, train.csv / test.csv) with CREMA-D's class list.
"""
import gzip
import io
import json
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from equimodal.data import load_dataset
from equimodal.data.audio import read_wav
from equimodal.data.avdigits import (FSDD_DIR, MNIST_TEST_IMAGES, MNIST_TEST_LABELS, MNIST_TRAIN_5K,
                                     avdigits_splits, prepare_avdigits, read_idx, read_mnist_csv)
from equimodal.data.video import write_wav
from equimodal.errors import DataError, DataNotFoundError

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
TEST_CLIPS = [f"20{i:02d}_X_{e}_XX" for i, e in enumerate(EMOTIONS)]
TRAIN_CLIPS = [f"10{i:02d}_X_{e}_XX" for i, e in enumerate(EMOTIONS)]


# --- fake sources -------------------------------------------------------------------------------
def tone(n, rate):
    return (8000 * np.sin(2 * np.pi * 300 * np.arange(n) / rate)).astype(np.int16)


def wav_bytes(n=800, rate=8000):
    buf = io.BytesIO()
    import wave
    with wave.open(buf, "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(rate)
        fh.writeframes(tone(n, rate).tobytes())
    return buf.getvalue()


def idx_bytes(arr):
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def csv_text(pixels, labels):
    return "".join(",".join(map(str, list(p.reshape(-1)) + [int(lab)])) + "\n" for p, lab in zip(pixels, labels))


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def fake_avdigits(src):
    """20 FSDD recordings (digits 0-9, takes 0 and 5 of one speaker, 0.1 s) and 2 MNIST images per
    digit in each pool: enough for prepare_avdigits's official split (one recording per digit and split)."""
    rng = np.random.default_rng(0)
    for d in range(10):
        for take in (0, 5):
            path = src / FSDD_DIR / f"{d}_george_{take}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(wav_bytes())
    labels = np.repeat(np.arange(10), 2)
    (src / "mnist").mkdir(parents=True, exist_ok=True)
    (src / MNIST_TEST_IMAGES).write_bytes(gz(idx_bytes(rng.integers(0, 256, (20, 28, 28)))))
    (src / MNIST_TEST_LABELS).write_bytes(gz(idx_bytes(labels)))
    (src / "mnist-train5k").mkdir(parents=True, exist_ok=True)
    (src / MNIST_TRAIN_5K).write_bytes(gz(csv_text(rng.integers(0, 256, (20, 28, 28)), labels).encode()))
    return src


def jpeg_bytes(rng, size=(16, 12)):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def fake_paper_layout(root):
    """CREMA-D-like layout: 6 train and 6 test clips (one per emotion), 0.2 s of 16 kHz audio, 2 frames."""
    rng = np.random.default_rng(0)
    for clip in TRAIN_CLIPS + TEST_CLIPS:
        write_wav(root / "audio" / f"{clip}.wav", tone(3200, 16000), 16000)
        folder = root / "visual" / "Image-01-FPS" / clip
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(2):
            (folder / f"frame_{k + 1:05d}.jpg").write_bytes(jpeg_bytes(rng))
    (root / "train.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in TRAIN_CLIPS))
    (root / "test.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in TEST_CLIPS))
    return root


def load_paper(root, cache):
    """Load the layout and fetch every test item (all frames: frames=2) through __getitem__."""
    splits = load_dataset("cremad", root=str(root), cache_dir=str(cache), frames=2, image_size=16, val_fraction=0.0)
    items = [splits.test[i] for i in range(len(splits.test))]
    assert all(x["audio"].shape == (1, 257, 188) and x["visual"].shape == (3, 2, 16, 16) for x, _ in items)
    return splits


@pytest.fixture(scope="module")
def avd_template(tmp_path_factory):
    return fake_avdigits(tmp_path_factory.mktemp("avd") / "src")


@pytest.fixture(scope="module")
def paper_template(tmp_path_factory):
    return fake_paper_layout(tmp_path_factory.mktemp("paper") / "root")


@pytest.fixture
def avd(avd_template, tmp_path):
    return shutil.copytree(avd_template, tmp_path / "src")


@pytest.fixture
def paper(paper_template, tmp_path):
    return shutil.copytree(paper_template, tmp_path / "root")


def raises_naming(path, fn, *args, **kwargs):
    """``fn`` raises a DataError whose one-line message names ``path``; returns the message."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg, msg
    return msg


def test_fake_sources_load(avd, paper, tmp_path):
    out = prepare_avdigits(avd, tmp_path / "out", progress=False)
    assert torch.load(out / "avdigits.pt", weights_only=True)["test"]["visual"].shape == (10, 28, 28)
    load_paper(paper, tmp_path / "cache")


# --- one test per case ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind, data, what", [
    ("corrupt", b"RIFF\x24\x00\x00\x00WAVEjunkjunkjunk", "cannot read WAV"),
    ("empty", b"", "cannot read WAV"),
    ("no samples", wav_bytes(n=0), "no samples"),
    ("wrong rate", wav_bytes(rate=16000), "sample rate 16000 Hz, expected 8000"),
    ("truncated", wav_bytes()[:801], "truncated WAV"),
])
def test_bad_fsdd_wav_is_named(avd, tmp_path, kind, data, what):
    path = avd / FSDD_DIR / "3_george_5.wav"
    path.write_bytes(data)
    assert what in raises_naming(path, prepare_avdigits, avd, tmp_path / "out", progress=False)


@pytest.mark.parametrize("kind", ["corrupt", "empty", "zero rate", "absurd rate"])
def test_bad_clip_wav_is_named_when_fetched(paper, tmp_path, kind):
    path = paper / "audio" / f"{TEST_CLIPS[2]}.wav"
    good = path.read_bytes()
    data = {"corrupt": b"RIFF" + bytes(60), "empty": b"",
            "zero rate": good[:24] + struct.pack("<I", 0) + good[28:],
            "absurd rate": good[:24] + struct.pack("<I", 7) + good[28:]}[kind]
    path.write_bytes(data)
    raises_naming(path, load_paper, paper, tmp_path / "cache")
    # any real rate is resampled (documented): 8 kHz loads
    write_wav(path, tone(1600, 8000), 8000)
    load_paper(paper, tmp_path / "cache")


def test_unreadable_or_truncated_images_are_named(avd, paper, tmp_path):
    frame = paper / "visual" / "Image-01-FPS" / TEST_CLIPS[1] / "frame_00002.jpg"
    frame.write_bytes(frame.read_bytes()[:200])
    assert "cannot read frame" in raises_naming(frame, load_paper, paper, tmp_path / "cache")
    frame.write_bytes(b"not a jpeg")
    raises_naming(frame, load_paper, paper, tmp_path / "cache")

    images = avd / MNIST_TEST_IMAGES
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gz(raw[:-100]))
    assert "holds" in raises_naming(images, read_idx, images)
    images.write_bytes(gz(raw)[:-30])  # the gzip stream itself cut short
    raises_naming(images, prepare_avdigits, avd, tmp_path / "out", progress=False)
    images.write_bytes(gz(raw[:10]))  # cut inside the IDX header
    assert "truncated IDX header" in raises_naming(images, read_idx, images)

    table = avd / MNIST_TRAIN_5K
    text = gzip.decompress(table.read_bytes())
    table.write_bytes(gz(text[:len(text) // 2]))  # cut inside a row
    raises_naming(table, read_mnist_csv, table)


def test_labels_outside_the_class_list_are_named(avd, paper, tmp_path):
    test_csv = paper / "test.csv"
    test_csv.write_text(test_csv.read_text() + f"{TEST_CLIPS[0]},BORED\n")
    assert "BORED" in raises_naming(test_csv, load_paper, paper, tmp_path / "cache")
    # a dataset without a fixed class list takes it from train.csv: a test label not there is named
    root = tmp_path / "ks"
    (root / "audio").mkdir(parents=True)
    (root / "train.csv").write_text("a,dog\nb,cat\n")
    (root / "test.csv").write_text("c,cow\n")
    assert "cow" in raises_naming(root / "test.csv", load_dataset, "kinetics-sounds", root=str(root),
                                  cache_dir=str(tmp_path / "c"))

    labels = avd / MNIST_TEST_LABELS
    labels.write_bytes(gz(idx_bytes(np.array([0, 1, 2, 10] + [3] * 16))))
    assert "label 10 at index 3" in raises_naming(labels, prepare_avdigits, avd, tmp_path / "o", progress=False)
    table = avd / MNIST_TRAIN_5K
    table.write_bytes(gz(csv_text(np.zeros((2, 28, 28), dtype=int), [4, 12]).encode()))
    assert "label 12 at row 1" in raises_naming(table, read_mnist_csv, table)


def test_csv_with_a_missing_column_is_named(avd, paper, tmp_path):
    train_csv = paper / "train.csv"
    train_csv.write_text(train_csv.read_text() + "1099_X_NEU_XX\n")
    assert "train.csv:7: expected 'clip_id,label'" in raises_naming(train_csv, load_paper, paper, tmp_path / "c")
    train_csv.write_text(f"{TRAIN_CLIPS[0]},\n")
    assert "empty label" in raises_naming(train_csv, load_paper, paper, tmp_path / "c")

    table = avd / MNIST_TRAIN_5K
    table.write_bytes(gz(csv_text(np.zeros((3, 28, 28), dtype=int), [1, 2, 3]).replace("0,", "", 1).encode()))
    raises_naming(table, read_mnist_csv, table)  # one row short of a column
    lines = [line.split(",", 1)[1] for line in csv_text(np.zeros((3, 28, 28), dtype=int), [1, 2, 3]).splitlines()]
    table.write_bytes(gz(("\n".join(lines) + "\n").encode()))
    assert "expected 785 columns" in raises_naming(table, read_mnist_csv, table)  # every row


def test_corrupt_caches_are_rebuilt_or_named(avd, paper, tmp_path, capsys):
    # spectrogram cache (<cache>/cremad-spec-*/<clip>.npy): rebuilt from the WAV and overwritten
    cache = tmp_path / "cache"
    fresh = load_paper(paper, cache).test[0][0]["audio"]
    cached = next(cache.glob(f"cremad-spec-*/{TEST_CLIPS[0]}.npy"))
    for bad in (b"", b"garbage", cached.read_bytes()[:100]):
        cached.write_bytes(bad)
        again = load_paper(paper, cache).test[0][0]["audio"]
        assert torch.allclose(again, fresh, atol=1e-2)
        assert np.load(cached).shape == (257, 188), "rewritten"
    for foreign in (np.zeros(3, dtype=np.float16), np.full((257, 188), np.inf, dtype=np.float16)):
        np.save(cached, foreign)  # loads, but is not a spectrogram of this preset / not finite
        assert torch.allclose(load_paper(paper, cache).test[0][0]["audio"], fresh, atol=1e-2)

    # avdigits.pt in the cache folder: rebuilt from the sources, with a warning
    splits = avdigits_splits(source=str(avd), cache_dir=str(tmp_path / "ac"), val_fraction=0.0, progress=False)
    pt = next((tmp_path / "ac").glob("avdigits-*/avdigits.pt"))
    pt.write_bytes(pt.read_bytes()[:500])
    capsys.readouterr()
    again = avdigits_splits(source=str(avd), cache_dir=str(tmp_path / "ac"), val_fraction=0.0, progress=False)
    out = capsys.readouterr().out
    assert "rebuilding" in out and str(pt) in out
    assert torch.equal(again.test.inputs["audio"], splits.test.inputs["audio"])

    # a prepared folder: named error (the loader does not know its sources)
    prepared = prepare_avdigits(avd, tmp_path / "prep", progress=False)
    (prepared / "avdigits.pt").write_bytes(b"\x00" * 64)
    assert "corrupt AV-Digits cache" in raises_naming(prepared / "avdigits.pt", avdigits_splits,
                                                      prepared=str(prepared), progress=False)
    torch.save({"train": torch.zeros(2)}, prepared / "avdigits.pt")
    raises_naming(prepared / "avdigits.pt", avdigits_splits, prepared=str(prepared), progress=False)
    (prepared / "manifest.json").write_text("{not json")
    raises_naming(prepared / "manifest.json", avdigits_splits, prepared=str(prepared), progress=False)
    (prepared / "manifest.json").write_text(json.dumps({"dataset": "avdigits"}))
    raises_naming(prepared / "manifest.json", avdigits_splits, prepared=str(prepared), progress=False)


def test_read_wav_named_and_tolerant_of_streaming_headers(tmp_path):
    path = tmp_path / "x.wav"
    good = wav_bytes(n=100)
    path.write_bytes(good[:40] + struct.pack("<I", 0xFFFFFFFF) + good[44:] + b"\x01")  # ffmpeg to a pipe
    wave_, rate = read_wav(path)
    assert rate == 8000 and wave_.numel() == 100, "whole frames up to the end of the file"
    raises_naming(tmp_path / "missing.wav", read_wav, tmp_path / "missing.wav")


# --- fuzz -------------------------------------------------------------------------------------------
def _header_variants(kind, good, rng):
    """Wrong headers for each kind of file (the body left as it was)."""
    if kind in ("fsdd-wav", "clip-wav"):
        return [b"RIFX" + good[4:], good[:8] + b"AVI " + good[12:],
                good[:20] + struct.pack("<H", 3) + good[22:],  # IEEE float, not PCM
                good[:22] + struct.pack("<H", 0) + good[24:],  # no channels
                good[:24] + struct.pack("<I", int(rng.integers(0, 1000))) + good[28:],  # absurd rate
                good[:34] + struct.pack("<H", 24) + good[36:],  # 24-bit
                good[:40] + struct.pack("<I", len(good)) + good[44:]]  # data chunk longer than the file
    if kind == "frame-jpeg":
        return [b"\x89PNG\r\n\x1a\n" + good[8:], b"GIF89a" + good[6:], bytes(4) + good[4:],
                good[:2] + rng.bytes(30) + good[32:]]
    if kind in ("mnist-images", "mnist-labels"):
        raw = gzip.decompress(good)
        return [gz(raw[:2] + b"\x0d" + raw[3:]),  # float, not unsigned byte
                gz(raw[:3] + bytes([int(rng.integers(5, 255))]) + raw[4:]),  # wrong number of dimensions
                gz(raw[:4] + struct.pack(">I", struct.unpack(">I", raw[4:8])[0] + 1) + raw[8:]),  # count + 1
                b"PK\x03\x04" + good[4:]]  # not gzip
    if kind == "mnist-csv":
        text = gzip.decompress(good)
        return [gz(b",".join(f"p{i}".encode() for i in range(784)) + b",label\n" + text),  # a header row
                gz(text.replace(b",", b";")), gz(b"\xff\xfe" + text.decode().encode("utf-16-le")),
                b"BZh9" + good[4:]]
    if kind == "split-csv":
        return [b"clip_id,label\n" + good, rng.bytes(8) + good, b"\xff\xfe" + good.decode().encode("utf-16-le"),
                good.replace(b",", b";"), good.replace(b",", b"\t")]
    raise AssertionError(kind)


FILES = ["fsdd-wav", "mnist-images", "mnist-labels", "mnist-csv", "clip-wav", "frame-jpeg", "split-csv"]
CORRUPTIONS = ["random", "truncate", "truncate-inner", "empty", "header"]
CASES = [(f, c) for f in FILES for c in CORRUPTIONS]  # 35 cases, each with its own seeded draws
DRAWS = 3  # seeded draws per random / truncation case; a header case tries every wrong header of its kind


def _corrupt_versions(kind, corruption, good, gzipped, rng):
    if corruption == "empty":
        return [b""]
    if corruption == "header":
        return _header_variants(kind, good, rng)
    out = []
    for _ in range(DRAWS):
        if corruption == "random":
            out.append(rng.bytes(int(rng.integers(1, 2 * len(good)))))
        elif corruption == "truncate":
            out.append(good[:int(rng.integers(1, len(good)))])
        elif gzipped:  # truncate-inner: cut the decompressed content, compress again
            inner = gzip.decompress(good)
            out.append(gz(inner[:int(rng.integers(1, len(inner)))]))
        else:  # truncate-inner: cut inside the header region
            out.append(good[:int(rng.integers(1, min(64, len(good))))])
    return out


@pytest.mark.parametrize("seed, kind, corruption", [(i, f, c) for i, (f, c) in enumerate(CASES)],
                         ids=[f"{f}-{c}" for f, c in CASES])
def test_fuzz_corrupt_source_files_end_in_a_named_data_error(avd, paper, tmp_path, seed, kind, corruption):
    """Seeded corrupt files in place of one source file: loading ends in a DataError naming it.

    Corruptions: random bytes (random length), a cut at a random point (``truncate``; for gzip
    sources ``truncate-inner`` cuts the decompressed content and compresses it again, for the others
    it cuts inside the first 64 bytes), an empty file, wrong headers. A cut file may still be valid
    (a split list or MNIST CSV cut at a line end, a JPEG cut only in its end marker): then it must
    load (WAVs cut anywhere are caught: the data chunk is shorter than its header says). Nothing
    else may load, and no other exception type may escape. AV-Digits sources are prepared and the
    prepared folder loaded; the paper layout is loaded and every test item fetched (all frames).
    """
    rng = np.random.default_rng([2024, seed])
    if kind in ("fsdd-wav", "mnist-images", "mnist-labels", "mnist-csv"):
        path = {"fsdd-wav": avd / FSDD_DIR / f"{int(rng.integers(10))}_george_{int(rng.choice([0, 5]))}.wav",
                "mnist-images": avd / MNIST_TEST_IMAGES, "mnist-labels": avd / MNIST_TEST_LABELS,
                "mnist-csv": avd / MNIST_TRAIN_5K}[kind]

        def load(work):
            out = prepare_avdigits(avd, work, progress=False)
            avdigits_splits(prepared=str(out), val_fraction=0.0, progress=False)
    else:
        clip = TEST_CLIPS[int(rng.integers(len(TEST_CLIPS)))]
        path = {"clip-wav": paper / "audio" / f"{clip}.wav",
                "frame-jpeg": paper / "visual" / "Image-01-FPS" / clip / f"frame_0000{int(rng.integers(1, 3))}.jpg",
                "split-csv": paper / str(rng.choice(["train.csv", "test.csv"]))}[kind]

        def load(work):
            load_paper(paper, work)  # a fresh spectrogram cache: the WAV is read
    good = path.read_bytes()
    for j, data in enumerate(_corrupt_versions(kind, corruption, good, path.suffix == ".gz", rng)):
        assert data != good
        path.write_bytes(data)
        try:
            load(tmp_path / f"work{j}")
        except DataError as exc:
            assert str(path) in str(exc), f"{kind}/{corruption}/{j}: {exc}"
            # one line, but for the pre-existing list of missing clip files (a garbled clip id)
            assert "\n" not in str(exc) or isinstance(exc, DataNotFoundError), str(exc)
        else:
            assert corruption.startswith("truncate"), f"{kind}/{corruption}/{j} ({len(data)} bytes) loaded"
