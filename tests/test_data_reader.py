"""CPU reader, augmentation, token-budget batching and collation."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from hlip_fast import pack_studies
from hlip_fast.data import PrepareConfig
from hlip_fast.data.batching import BatchConfig, TokenBudget, collate
from hlip_fast.data.codec import decompress_slices
from hlip_fast.data.reader import RawStudies, StudyBatches, cpu_loader, decode_cpu
from hlip_fast.data.synth import SIZES, synthesize
from hlip_fast.data.transforms import Study, TransformConfig, to_study

PATCH = (4, 8, 8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    config = replace(SIZES["tiny"], num_studies=14, max_scans=4)
    synthesize(root, config, PrepareConfig(studies_per_shard=4))
    return root


def ids(studies) -> list[str]:
    return [s.study_id for s in studies]


def test_eval_decodes_exactly_and_deterministically(corpus):
    raw = list(RawStudies(corpus))
    assert len(raw) == 14
    first = list(StudyBatches(RawStudies(corpus)).studies())
    second = list(StudyBatches(RawStudies(corpus)).studies())
    for r, a, b in zip(raw, first, second):
        volume = decompress_slices(r.blob, r.sizes, (32, 32), "uint8")
        expected = torch.split(torch.from_numpy(volume).float() / 255.0, r.depths)
        assert a.study_id == r.study_id and a.report == r.meta["report"] and a.labels == r.meta["labels"]
        stored = torch.split(torch.from_numpy(volume), r.depths)
        assert all(torch.equal(x, s) for x, s in zip(a.scans, stored))  # the integers, untouched
        for x, y, z in zip(a.normalised(), b.normalised(), expected):
            assert torch.equal(x, y)  # deterministic, bit for bit
            torch.testing.assert_close(x, z, rtol=1e-6, atol=1e-7)  # x / 255 up to float32 rounding


def test_train_augmentation_seeded_per_epoch(corpus):
    config = TransformConfig(crop=(24, 16), max_depth=8, flip_axes=(0, 2), jitter=0.1, max_scans=2, seed=5)
    raw = next(iter(RawStudies(corpus)))
    scans = decode_cpu(raw)
    a, b = to_study(raw, scans, config, True, 0), to_study(raw, scans, config, True, 0)
    c = to_study(raw, scans, config, True, 1)
    assert a.report == b.report and all(torch.equal(x, y) for x, y in zip(a.scans, b.scans))
    assert a.intensity == b.intensity and a.intensity != c.intensity  # jitter: seeded per epoch
    assert all(s.shape[1:] == (24, 16) and s.shape[0] <= 8 for s in a.scans) and len(a.scans) <= 2
    assert sorted(a.report.split(". ")) != [] and set(a.report.replace(".", "").split()) == set(
        raw.meta["report"].replace(".", "").split()
    )
    differs = (
        a.report != c.report
        or any(not torch.equal(x, y) for x, y in zip(a.scans, c.scans))
        or len(a.scans) != len(c.scans)
    )
    assert differs
    evaluated = to_study(raw, scans, config, False, 0)
    assert all(s.shape[1:] == (24, 16) for s in evaluated.scans) and evaluated.report == raw.meta["report"]


def test_dual_models_sentences_are_seeded_drawn_last_and_interleaved_with_reports(corpus):
    plain = TransformConfig(crop=(24, 16), jitter=0.1, seed=5)
    dual = replace(plain, sentences=True)
    raws = list(RawStudies(corpus))[:6]
    drawn = []
    for raw in raws:
        scans = decode_cpu(raw)
        a, b, without = (to_study(raw, scans, c, True, 0) for c in (dual, dual, plain))
        assert a.sentence == b.sentence and without.sentence is None
        assert a.sentence in raw.meta["report"] and a.report == without.report  # the other draws unchanged
        assert a.intensity == without.intensity and all(
            torch.equal(x, y) for x, y in zip(a.scans, without.scans)
        )
        first = raw.meta["report"].split(". ")[0]
        assert to_study(raw, scans, dual, False, 0).sentence.rstrip(".") == first.rstrip(".")
        drawn.append(a)
    assert len({s.sentence for s in drawn}) > 1
    batch = collate(drawn[:3], (4, 8, 8))
    assert batch.texts == [t for s in drawn[:3] for t in (s.sentence, s.report)]
    assert collate([replace(s, sentence=None) for s in drawn[:2]], (4, 8, 8)).texts == [
        s.report for s in drawn[:2]
    ]
    with pytest.raises(ValueError, match="report sentences"):
        collate([drawn[0], replace(drawn[1], sentence=None)], (4, 8, 8))


@pytest.mark.parametrize("train", [False, True])
def test_rank_and_worker_sharding_cover_every_study_once(corpus, train):
    everything = ids(RawStudies(corpus))
    for world in (2, 3, 5):  # 4 shards: round-robin shards for 2 and 3, study-level split for 5
        parts = [
            ids(RawStudies(corpus, train=train, rank=r, world_size=world, shuffle_buffer=3))
            for r in range(world)
        ]
        assert sorted(sum(parts, [])) == sorted(everything)
    loaded = [
        s
        for b in cpu_loader(StudyBatches(RawStudies(corpus), batching=BatchConfig(PATCH, 300)), num_workers=2)
        for s in b.study_ids
    ]
    assert sorted(loaded) == sorted(everything)


def test_workers_tokenise_the_reports_of_their_batches_as_the_text_tower_does(corpus, tiny_text):
    from hlip_fast.text import TextConfig, TextTower

    tower = TextTower(TextConfig(tiny_text[0], context_length=16), 8)
    reader = StudyBatches(
        RawStudies(corpus, train=True, seed=2),
        batching=BatchConfig(PATCH, 300),
        tokenize=tower.report_tokenizer(),
    )
    batches = list(cpu_loader(reader, num_workers=2))
    assert batches and all(b.text is not None for b in batches)
    for batch in batches:  # the shuffled sentences the worker made, tokenised there
        expected = tower.tokenize(batch.reports)
        assert batch.text.keys() == expected.keys()
        assert all(torch.equal(batch.text[k], expected[k]) for k in expected)
        assert batch.text["input_ids"].shape[1] <= 16


def test_shuffle_depends_on_epoch(corpus):
    dataset = RawStudies(corpus, train=True, shuffle_buffer=4, seed=1)
    epoch0, again = ids(dataset), ids(dataset)
    dataset.set_epoch(1)
    assert epoch0 == again and ids(dataset) != epoch0 and sorted(ids(dataset)) == sorted(epoch0)


def test_corrupt_shard_named_or_skipped(corpus, tmp_path):
    shards = sorted(corpus.glob("shard-*.tar"))
    broken = tmp_path / "broken.tar"
    data = shards[1].read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="broken.tar"):
        list(RawStudies([shards[0], broken, shards[2]]))
    reader = RawStudies([shards[0], broken, shards[2]], on_error="skip")
    kept = ids(reader)
    assert set(ids(RawStudies([shards[0], shards[2]]))) <= set(kept) and len(reader.skipped) == 1


def fake_study(name: str, depths: list[int], rng) -> Study:
    return Study(
        name,
        [torch.from_numpy(rng.random((d, 16, 16), dtype=np.float32)) for d in depths],
        f"report {name}",
        {"a": 1},
    )


def test_token_budget_keeps_every_study_and_the_budget(seed, caplog):
    rng = np.random.default_rng(seed)
    studies = [
        fake_study(f"s{i}", list(rng.integers(1, 17, size=int(rng.integers(1, 5)))), rng) for i in range(40)
    ]
    studies.append(fake_study("huge", [64, 64], rng))  # 2 * 16 * 4 = 128 tokens > 100
    budget = TokenBudget(100, PATCH, max_studies=5, group_size=8)
    with caplog.at_level(logging.WARNING):
        steps = list(budget(studies))
    assert sorted(s.study_id for step in steps for s in step) == sorted(ids(studies))
    for step in steps:
        tokens = sum(s.tokens(PATCH) for s in step)
        assert len(step) <= 5 and (tokens <= 100 or [s.study_id for s in step] == ["huge"])
    assert "huge" in caplog.text and 0 < budget.mean_fill <= 1.3
    cropped = list(TokenBudget(100, PATCH, oversize="crop")([studies[-1]]))
    assert cropped[0][0].tokens(PATCH) <= 100


def test_collate_matches_pack_studies(seed):
    rng = np.random.default_rng(seed)
    studies = [fake_study("x", [5, 8], rng), fake_study("y", [3], rng)]
    studies[1].labels = {"b": 0}
    batch = collate(studies, PATCH, pad_value=-1.0, max_tokens=64)
    padded = [
        [torch.cat([s, torch.full((-s.shape[0] % 4, 16, 16), -1.0)]) for s in st.scans] for st in studies
    ]
    expected = pack_studies(padded, PATCH)
    assert torch.equal(batch.studies.patches, expected.patches)
    assert batch.label_names == ("a", "b") and batch.labels.tolist() == [[1, -1], [-1, 0]]
    assert batch.fill == pytest.approx(expected.layout.num_tokens / 64)
    with pytest.raises(ValueError, match="study x"):
        collate([Study("x", [torch.zeros(4, 12, 16)], "r")], PATCH)


def test_a_readers_integer_batch_lands_as_the_float_batch_it_stands_for(corpus):
    """Reader batches keep the stored integers and each scan's intensity map; landing them
    (``.to``, or the encoder itself) gives the patches of the normalised scans, bit for bit,
    depth padding being the stored minimum through the scan's map."""
    from hlip_fast import create_model

    transforms = TransformConfig(mean=0.4, std=0.2, jitter=0.1, crop=(24, 16), flip_axes=(0, 2), seed=1)
    studies = [to_study(r, decode_cpu(r), transforms, True, 0) for r in list(RawStudies(corpus))[:5]]
    batch = collate(studies, PATCH).studies
    assert batch.patches.dtype == torch.uint8 and batch.intensity.shape == (batch.layout.num_scans, 2)
    padded = [
        [
            torch.cat([x, torch.full((-x.shape[0] % 4, *x.shape[1:]), b)])
            for x, (_, b) in zip(s.normalised(), s.intensity)
        ]
        for s in studies
    ]
    expected = pack_studies(padded, PATCH).patches
    landed = batch.to("cpu")
    assert landed.intensity is None and torch.equal(landed.patches, expected)
    assert torch.equal(batch.to("cpu", torch.bfloat16).patches, expected.to(torch.bfloat16))
    model = create_model("vit_tiny_multiscan_h2", patch_size=PATCH, max_num_scans=4).eval()
    with torch.no_grad():
        a, b = model.forward_features(batch), model.forward_features(landed)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="some studies carry intensity maps"):
        collate([studies[0], Study("x", [torch.zeros(4, 24, 16)], "r")], PATCH)


@pytest.mark.gpu
def test_a_pinning_loader_pins_the_patches_it_delivers(corpus):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    reader = StudyBatches(RawStudies(corpus), batching=BatchConfig(PATCH, 300))
    batches = list(cpu_loader(reader, 2, pin_memory=True))
    assert batches and all(b.studies.patches.is_pinned() for b in batches)


def test_dali_reader_matches_cpu_reader(corpus):
    pytest.importorskip("nvidia.dali", reason="DALI not installed (pip install hlip-fast[dali])")
    from hlip_fast.data.dali import DaliBatches, DaliStudies

    dali = list(
        DaliBatches(DaliStudies(corpus, device_id=None, batch_size=3), batching=BatchConfig(PATCH, 300))
    )
    cpu = list(StudyBatches(RawStudies(corpus), batching=BatchConfig(PATCH, 300)))
    assert [b.study_ids for b in dali] == [b.study_ids for b in cpu]
    for a, b in zip(dali, cpu):
        assert torch.equal(a.studies.patches, b.studies.patches) and a.reports == b.reports
        assert torch.equal(a.labels, b.labels)
    halves = [
        [r.study_id for r, _ in DaliStudies(corpus, rank=k, world_size=2, batch_size=4)] for k in range(2)
    ]
    assert sorted(sum(halves, [])) == sorted(s for b in cpu for s in b.study_ids) and not set(
        halves[0]
    ) & set(halves[1])


@pytest.mark.gpu
def test_nvcomp_gpu_decode_matches_cpu(corpus):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("nvidia.nvcomp", reason="nvCOMP not installed (pip install hlip-fast[nvcomp])")
    from hlip_fast.data.gpu import NvcompDecoder

    decoder = NvcompDecoder("cuda")
    for raw in RawStudies(corpus):
        for gpu_scan, cpu_scan in zip(decoder(raw), decode_cpu(raw)):
            assert gpu_scan.is_cuda and torch.equal(gpu_scan.cpu(), cpu_scan)
    gpu = list(StudyBatches(RawStudies(corpus), batching=BatchConfig(PATCH, 300), decode=decoder))
    cpu = list(StudyBatches(RawStudies(corpus), batching=BatchConfig(PATCH, 300)))
    for a, b in zip(gpu, cpu):
        assert a.studies.patches.is_cuda and torch.equal(a.studies.patches.cpu(), b.studies.patches)
