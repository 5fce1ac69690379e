"""Zero-shot prompts, classifiers and metrics; hlip-eval and hlip-embed end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import product

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import hlip_fast
from hlip_fast.data import PrepareConfig, prepare
from hlip_fast.data.synth import SIZES, write_raw
from hlip_fast.evaluation import (
    ZeroShotClassifier,
    binary_metrics,
    builtin_prompt_sets,
    load_prompts,
    multiclass_metrics,
    retrieval_recall,
)
from hlip_fast.evaluation.cli import embed_main, eval_main


@pytest.mark.parametrize(
    "name, count, example",
    [("cq500", 11, "MidlineShift"), ("rsna_ich", 6, "epidural"), ("mr_rate", 37, "Chiari malformation")],
)
def test_prompt_sets_of_the_later_hlip_benchmarks(name, count, example):
    """CQ500's 11 findings, RSNA's five subtypes and "any", MR-RATE's 37: each a negative and a
    positive option, the two never the same text."""
    prompts = load_prompts(name)
    assert prompts.protocol == "binary" and len(prompts.options) == count and example in prompts.options
    for negative, positive in prompts.options.values():
        assert negative and positive and not set(prompts.texts(negative)) & set(prompts.texts(positive))


def test_builtin_and_user_prompt_files(tmp_path):
    assert {"ct_rate", "synth_ct", "synth_mr"} <= set(builtin_prompt_sets())
    ct_rate = load_prompts("ct_rate")
    assert ct_rate.protocol == "binary" and len(ct_rate.options) == 18
    assert ct_rate.options["Emphysema"] == (("no emphysema",), ("emphysema",))
    user = tmp_path / "brain.json"
    user.write_text(
        json.dumps(
            {"protocol": "multiclass", "templates": ["a {} scan"], "classes": {"a": "x", "b": ["y", "z"]}}
        )
    )
    prompts = load_prompts(user)
    assert prompts.name == "brain" and prompts.options["b"] == (("y", "z"),)
    assert prompts.texts(("y", "z")) == ["a y scan", "a z scan"]
    yaml_file = tmp_path / "bad.yaml"
    for text, message in [
        ("protocol: binary\nfindings: {mass: [no mass]}\n", "mass.*negative, positive"),
        ("protocol: binary\ntemplates: ['no braces']\nfindings: {mass: [a, b]}\n", "exactly one"),
        ("protocol: ranking\n", "protocol"),
        ("protocol: multiclass\nclasses: {a: x}\n", "at least two"),
    ]:
        yaml_file.write_text(text)
        with pytest.raises(ValueError, match=message) as error:
            load_prompts(yaml_file)
        assert str(yaml_file) in str(error.value)
    with pytest.raises(FileNotFoundError, match="built-in sets"):
        load_prompts("no_such_set")


def mann_whitney_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p, n in product(pos, neg)]))


def test_binary_metrics_ignore_unlabelled_and_flag_one_class(rng):
    targets = rng.integers(0, 2, size=(40, 3))
    targets[rng.random((40, 3)) < 0.2] = -1
    targets[:, 2] = np.where(targets[:, 2] >= 0, 1, -1)  # one class only
    scores = rng.random((40, 3))
    result = binary_metrics(targets, scores, ["a", "b", "c"])
    for j, name in enumerate("ab"):
        known = targets[:, j] >= 0
        y, s = targets[known, j], scores[known, j]
        got = result["per_finding"][name]
        assert got["studies"] == known.sum() and got["positives"] == y.sum()
        assert got["auc"] == pytest.approx(mann_whitney_auc(y, s))
        pred = s > 0.5
        recall = [np.mean(pred[y == c] == c) for c in (0, 1)]
        assert got["balanced_accuracy"] == pytest.approx(np.mean(recall))
    assert (
        result["per_finding"]["c"]["auc"] is None
        and "positive and negative" in result["per_finding"]["c"]["note"]
    )
    assert result["macro"]["auc"] == pytest.approx(np.mean([result["per_finding"][n]["auc"] for n in "ab"]))


def test_roc_threshold_is_the_corner_closest_point(rng):
    y = rng.integers(0, 2, size=60)
    s = np.clip(y * 0.3 + rng.random(60) * 0.7, 0, 1)
    got = binary_metrics(y[:, None], s[:, None], ["x"], threshold="roc")["per_finding"]["x"]
    best = min(
        (((1 - np.mean(s[y == 1] >= t)) ** 2 + np.mean(s[y == 0] >= t) ** 2), t) for t in np.unique(s)
    )[1]
    pred = s >= best
    assert got["balanced_accuracy"] == pytest.approx(np.mean([np.mean(pred[y == c] == c) for c in (0, 1)]))


def test_multiclass_metrics_with_an_absent_class(rng):
    targets = rng.integers(0, 2, size=30) * 2  # classes 0 and 2 only, of 3
    probs = rng.dirichlet(np.ones(3), size=30)
    result = multiclass_metrics(targets, probs, ["a", "b", "c"])
    renormalised = probs[:, 2] / (probs[:, 0] + probs[:, 2])
    assert result["macro"]["auc"] == pytest.approx(mann_whitney_auc(targets // 2, renormalised))
    assert result["per_class"] == {"a": int((targets == 0).sum()), "b": 0, "c": int((targets == 2).sum())}


def test_retrieval_recall_against_brute_force(seed):
    study, text = F.normalize(torch.randn(25, 8), dim=-1), F.normalize(torch.randn(25, 8), dim=-1)
    text[:10] = study[:10]  # some perfect pairs
    got = retrieval_recall(study, text, ks=(1, 5))
    sim = study @ text.T
    for k in (1, 5):
        top = sim.topk(k, dim=1).indices
        assert got["study_to_text"][f"R@{k}"] == pytest.approx(np.mean([i in top[i] for i in range(25)]))
        top = sim.T.topk(k, dim=1).indices
        assert got["text_to_study"][f"R@{k}"] == pytest.approx(np.mean([i in top[i] for i in range(25)]))
    perfect = retrieval_recall(study, study.clone())
    assert perfect["study_to_text"]["R@1"] == 1.0


class LookupText:
    """A stand-in text encoder: a fixed random (unnormalised) vector per prompt."""

    def __init__(self, dim: int = 6):
        self.table, self.dim = {}, dim

    def encode_text(self, texts):
        return torch.stack([self.table.setdefault(t, torch.randn(self.dim)) for t in texts])


def test_classifier_averages_templates_and_softmaxes_pairs(seed):
    prompts = load_prompts("synth_mr")
    text = LookupText()
    classifier = ZeroShotClassifier.build(text, prompts)
    study = F.normalize(torch.randn(5, 6), dim=-1)
    probs = classifier.probabilities(study, 20.0)
    for j, (negative, positive) in enumerate(prompts.options.values()):

        def embed(phrases):
            parts = [F.normalize(text.table[t], dim=0) for t in prompts.texts(phrases)]
            return F.normalize(torch.stack(parts).mean(0), dim=0)

        logits = 20.0 * study @ torch.stack([embed(negative), embed(positive)]).T
        torch.testing.assert_close(probs[:, j], logits.softmax(-1)[:, 1])
    labels = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 1], [-1, 0]])
    with pytest.raises(ValueError, match=r"no label\(s\) \['hemorrhage'"):
        classifier.evaluate(study, 20.0, labels, ("mass", "infarct"))


@pytest.fixture(scope="module")
def raw_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    config = replace(SIZES["tiny"], num_studies=6, modality="MR", max_scans=2, depth_range=(8, 12))
    manifest = write_raw(root, config)
    return root, manifest


@pytest.fixture(scope="module")
def saved_model(tiny_text, tmp_path_factory):
    model = hlip_fast.create_clip("vit_tiny_multiscan_h2", tiny_text[0], embed_dim=16)
    return hlip_fast.save_pretrained(model, tmp_path_factory.mktemp("model") / "tiny")


def read_embeddings(path):
    with safe_open(path, "pt") as handle:
        return json.loads(handle.metadata()["study_ids"]), handle.get_tensor("embeddings"), handle.metadata()


def test_hlip_eval_writes_json_and_markdown(raw_corpus, saved_model, tmp_path, capsys):
    root, manifest = raw_corpus
    shards = tmp_path / "shards"
    prepare(manifest, shards, PrepareConfig(grid=(32, 32), default_modality="MR"))
    out = tmp_path / "eval"
    args = [str(shards), "--model", str(saved_model), "--prompts", "synth_mr", "--out", str(out), "--quiet"]
    assert eval_main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["studies"] == 6 and results["skipped"] == []
    assert set(results["retrieval"]["study_to_text"]) == {"R@1", "R@5", "R@10"}
    assert results["retrieval"]["study_to_text"]["R@10"] == 1.0  # 6 studies: every report is in the top 10
    zero_shot = results["zeroshot"]["synth_mr"]
    assert set(zero_shot["per_finding"]) == {"mass", "hemorrhage", "infarct"}
    out_text = capsys.readouterr().out
    assert "| **macro** |" in (out / "results.md").read_text() and "synth_mr" in out_text
    assert not out_text.startswith("[hlip-eval]")  # --quiet: the result only
    assert eval_main([*args[:-1], "--no-progress"]) == 0  # args[-1] is --quiet
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[hlip-eval] embed:")]
    assert lines and lines[-1].startswith("[hlip-eval] embed: 6/6 studies")  # a progress total
    assert (
        eval_main([str(shards), "--model", str(saved_model), "--prompts", "synth_ct", "--out", str(out)]) == 2
    )
    assert "no label(s)" in capsys.readouterr().err


def test_hlip_embed_same_from_shards_manifest_and_folder(raw_corpus, saved_model, tmp_path):
    root, manifest = raw_corpus
    shards = tmp_path / "shards"
    prepare(manifest, shards, PrepareConfig(grid=(32, 32), default_modality="MR"))
    bad = root / "zz_broken"
    bad.mkdir(exist_ok=True)
    (bad / "scan.nii.gz").write_bytes(b"not a nifti file")
    outputs = {}
    for name, source in [("shards", shards), ("manifest", manifest), ("folder", root)]:
        out = tmp_path / f"{name}.safetensors"
        common = ["--model", str(saved_model), "--grid", "32", "32", "--modality", "MR", "--quiet"]
        assert embed_main([str(source), *common, "--out", str(out)]) == 0
        outputs[name] = read_embeddings(out)
    ids, embeddings, _ = outputs["shards"]
    assert len(ids) == 6 and embeddings.shape == (6, 16)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(6))
    for name in ("manifest", "folder"):
        other_ids, other, metadata = outputs[name]
        assert other_ids == ids
        torch.testing.assert_close(other, embeddings, rtol=1e-5, atol=1e-5)
    skipped = json.loads(outputs["folder"][2]["skipped"])
    assert any(s["study_id"] == "zz_broken" and "scan.nii.gz" in s.get("file", "") for s in skipped)
    assert any(s["study_id"] == "zz_broken" and s.get("reason") == "no readable scan" for s in skipped)


def test_hlip_embed_writes_no_non_finite_embeddings(raw_corpus, saved_model, tmp_path, monkeypatch, capsys):
    """A model that computes NaN (weights checked elsewhere; here forced past the check): exit
    non-zero with the count and the first study named, no output file."""
    import hlip_fast.evaluation.cli as cli

    model = hlip_fast.load_pretrained(saved_model)
    with torch.no_grad():
        model.visual_proj.weight.fill_(float("nan"))
    monkeypatch.setattr(cli, "model_from_args", lambda args: model)
    root, manifest = raw_corpus
    out = tmp_path / "nan.safetensors"
    common = ["--model", str(saved_model), "--grid", "32", "32", "--modality", "MR", "--quiet"]
    assert embed_main([str(manifest), *common, "--out", str(out)]) != 0
    assert "6 of 6 study embeddings are not finite (first: study" in capsys.readouterr().err
    assert not out.exists()
