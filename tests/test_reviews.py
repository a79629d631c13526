"""Text + table: the tokenizer and the table codec fitted on train only, the reviews CSV's split and
columns (on a small file written here), the fitted vocabulary saved with a run and read by eval."""
import csv
import json

import pytest
import torch

pytest.importorskip("tokenizers", reason="Hugging Face tokenizers is not installed (pip install 'equimodal[text]')")

from equimodal.cli import main  # noqa: E402
from equimodal.config import load_config  # noqa: E402
from equimodal.data import load_dataset  # noqa: E402
from equimodal.data.avdigits import default_source  # noqa: E402
from equimodal.data.reviews import read_rows  # noqa: E402
from equimodal.data.table import TableCodec  # noqa: E402
from equimodal.data.text import UNK, encode, tokenizer_from_json, train_tokenizer  # noqa: E402
from equimodal.errors import DataError  # noqa: E402
from equimodal.models.encoders import TabularEncoder, TokenTransformer  # noqa: E402
from equimodal.train import Trainer  # noqa: E402

HEADER = ["Clothing ID", "Age", "Title", "Review Text", "Rating", "Recommended IND", "Positive Feedback Count",
          "Division Name", "Department Name", "Class Name"]
SMALL = ["train.epochs=1", "train.batch_size=16", "train.progress=false", "train.device=cpu", "model.width=8",
         "model.feature_dim=8", "train.probe=false"]


def write_reviews(path, n=80, vocabulary=("lovely", "awful")):
    """``n`` reviews whose text says the class; every row also has a word of its own (``w<i>``) and a
    category of its own in ``Class Name`` (``c<i>``), so what only test rows hold can be checked."""
    good, bad = vocabulary
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        for i in range(n):
            rec = int(i % 3 != 0)
            text = f'{good if rec else bad}, "really" {good if rec else bad}\nsecond line, w{i}'
            w.writerow([100 + i % 4, 20 + i, "" if i % 5 == 0 else f"Title {i}", text, 5 if rec else 2, rec,
                        i % 7 if i % 11 else "", "General", "Dresses" if i % 2 else "Tops", f"c{i}"])
    return path


def test_csv_fields_with_quotes_commas_and_newlines(tmp_path):
    rows, labels = read_rows(write_reviews(tmp_path / "r.csv"), "recommended")
    assert len(rows) == 80 and labels.tolist()[:3] == [0, 1, 1]
    assert rows[1]["Review Text"] == 'lovely, "really" lovely\nsecond line, w1'
    _, ratings = read_rows(tmp_path / "r.csv", "rating")
    assert set(ratings.tolist()) == {1, 4}, "ratings 2 and 5 are classes 1 and 4"


def test_bad_target_names_the_line(tmp_path):
    path = write_reviews(tmp_path / "r.csv", n=5)
    text = path.read_text().splitlines(keepends=True)
    path.write_text("".join(text).replace(",5,1,", ",5,yes,", 1))
    with pytest.raises(DataError, match=r"line \d+: Recommended IND is 'yes'"):
        read_rows(path, "recommended")
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no column"):
        read_rows(path, "recommended")


def test_split_is_seeded_stratified_and_disjoint(tmp_path):
    path = str(write_reviews(tmp_path / "r.csv"))
    a = load_dataset("reviews", source=path, min_frequency=1)
    b = load_dataset("reviews", source=path, min_frequency=1)
    c = load_dataset("reviews", source=path, min_frequency=1, split_seed=1)
    assert a.modalities == ("text", "table") and a.num_classes == 2
    assert len(a.train) + len(a.val) + len(a.test) == 80 and len(a.test) == 16
    assert torch.equal(a.test.inputs["table"], b.test.inputs["table"]), "the same split every time"
    assert not torch.equal(a.test.inputs["table"], c.test.inputs["table"])
    assert torch.bincount(a.test.labels).tolist() == [round(0.2 * 27), round(0.2 * 53)]
    rating = load_dataset("reviews", source=path, target="rating", modalities=["table"])
    assert rating.num_classes == 5 and rating.modalities == ("table",)


def test_tokenizer_and_table_are_fitted_on_train_only(tmp_path):
    path = str(write_reviews(tmp_path / "r.csv"))
    splits = load_dataset("reviews", source=path, min_frequency=1, max_len=16)
    tok = tokenizer_from_json(splits.fitted["tokenizer.json"])
    unk = tok.token_to_id(UNK)
    # each row's own word w<i> is its last token (before the padding, id 0)
    ids = {name: split.inputs["text"] for name, split in (("train", splits.train), ("test", splits.test))}
    own = {name: [int(row[row != 0][-1]) for row in x] for name, x in ids.items()}
    assert unk not in own["train"], "every training row's own word is in the vocabulary"
    assert set(own["test"]) == {unk}, "a word only test rows hold is unknown"
    assert tok.token_to_id("lovely") is not None and len(set(own["train"])) == len(splits.train)
    codec = TableCodec.from_json(splits.fitted["table.json"])
    table = splits.train.inputs["table"]
    class_col = codec.categorical.index("Class Name")
    assert (splits.test.inputs["table"][:, class_col] == 0).all(), "a category only test holds is unknown (0)"
    assert (table[:, class_col] > 0).all()
    numbers = table[:, len(codec.categorical):]
    assert torch.allclose(numbers.mean(0), torch.zeros(2), atol=0.1), "numbers standardised on train"
    assert splits.train.modality_kinds["text"]["kind"] == "tokens"
    assert splits.train.modality_kinds["table"]["categories"][class_col] == len(splits.train) + 1


def test_tokenizer_unit():
    tok = train_tokenizer(["the cat sat", "The cat ran"], min_frequency=1)
    ids = encode(tok, ["the dog sat", ""], max_len=5)
    assert ids.shape == (2, 5) and ids.dtype == torch.int32
    assert ids[0, 1] == tok.token_to_id(UNK) and ids[1].tolist() == [0] * 5


def test_saved_vocabulary_is_reused_by_eval_and_resume(tmp_path, capsys):
    path = write_reviews(tmp_path / "r.csv")
    out = tmp_path / "run"
    args = ["train", "--dataset", "reviews", "--set", f"data.source={path}", "--set", "data.min_frequency=1",
            "--set", "data.max_len=16", "--out", str(out), *[a for s in SMALL for a in ("--set", s)]]
    assert main(args) == 0, capsys.readouterr().err
    assert set(json.loads((out / "summary.json").read_text())["test_acc_by_modality"]) == {"text", "table"}
    saved = json.loads((out / "data" / "tokenizer.json").read_text())
    assert (out / "data" / "table.json").is_file() and "lovely" in saved["model"]["vocab"]
    # the file changes under the run: a tokenizer trained again would have another vocabulary (and size)
    write_reviews(path, vocabulary=("superb", "dreadful"))
    for i in range(5):  # more words than before, so the embedding table would not fit the weights
        with open(path, "a", newline="") as fh:
            csv.writer(fh).writerow([1, 30, f"extra{i} more{i} words{i}", "fine", 5, 1, 0, "General", "Tops", "x"])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt")]) == 0, capsys.readouterr().err
    trainer = Trainer(load_config(out / "config.yaml"), out_dir=out, echo=lambda s: None)  # as resume builds it
    assert trainer.splits.fitted["tokenizer.json"] == (out / "data" / "tokenizer.json").read_text()
    assert type(trainer.model.encoder("text")) is TokenTransformer
    assert type(trainer.model.encoder("table")) is TabularEncoder
    fresh = load_dataset("reviews", source=str(path), min_frequency=1, max_len=16)
    assert fresh.fitted["tokenizer.json"] != trainer.splits.fitted["tokenizer.json"]


def test_real_reviews_file():
    root = default_source()
    if not (root / "reviews" / "reviews.csv").is_file():
        pytest.skip(f"the reviews CSV is not at {root / 'reviews' / 'reviews.csv'} (set EQUIMODAL_DATA)")
    splits = load_dataset("reviews", modalities=["table"])  # the table alone: no tokenizer pass
    assert len(splits.train) + len(splits.val) + len(splits.test) == 23486
    labels = torch.cat([splits.train.labels, splits.val.labels, splits.test.labels])
    assert abs(float(labels.float().mean()) - 0.82) < 0.01, "82% recommend (SOURCE.md)"
    assert splits.train.modality_kinds["table"]["categories"][1:] == [4, 7, 21], "divisions, departments, classes + unknown"
