"""Zero-shot evaluation during training, with ``hlip-eval``'s logic on the held-out shards."""

from __future__ import annotations

import json
from pathlib import Path

from hlip_fast.console import Console
from hlip_fast.data.reader import RawStudies, decoded_studies
from hlip_fast.data.shards import read_index
from hlip_fast.data.transforms import model_transforms
from hlip_fast.evaluation import (
    ZeroShotClassifier,
    embed_batches,
    evaluate_embeddings,
    load_prompts,
    study_batches,
    to_markdown,
)

from .config import TrainConfig
from .distributed import Dist, barrier


class ZeroShotEval:
    def __init__(self, cfg: TrainConfig, model, console: Console):
        self.cfg, self.model, self.console = cfg, model, console
        self.prompt_sets = [load_prompts(p) for p in cfg.prompts]
        self.studies = read_index(cfg.val_data)["num_studies"]

    def run(self, step: int, run_dir: Path, dist: Dist) -> dict:
        """Scores on the main rank (the others wait); writes ``eval/step_N.{json,md}``; returns
        the macro metrics and retrieval for the metrics log."""
        summary = {}
        if dist.main:
            model, cfg = self.model, self.cfg
            was_training = model.training
            classifiers = [ZeroShotClassifier.build(model.eval(), p) for p in self.prompt_sets]
            raws = RawStudies(cfg.val_data, train=False, rank=0, world_size=1, on_error=cfg.on_error)
            studies = decoded_studies(raws, model_transforms(model), False, 0, on_damage=raws.damaged)
            self.console.say(f"zero-shot evaluation at step {step} on {self.studies} held-out studies")
            embeddings = embed_batches(
                model,
                study_batches(model, studies, cfg.max_tokens),
                device=dist.device,
                console=self.console,
                total=self.studies,
            )
            results = evaluate_embeddings(embeddings, classifiers, model.logit_scale.exp().item())
            results["skipped"] = raws.skipped
            model.train(was_training)
            out = run_dir / "eval"
            out.mkdir(exist_ok=True)
            (out / f"step_{step:08d}.json").write_text(json.dumps(results, indent=2))
            (out / f"step_{step:08d}.md").write_text(to_markdown(results) + "\n")
            summary = {f"zeroshot/{name}": z["macro"] for name, z in results["zeroshot"].items()}
            if "retrieval" in results:
                summary["retrieval"] = results["retrieval"]["study_to_text"]
        barrier()
        return summary
