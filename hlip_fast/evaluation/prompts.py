"""Zero-shot prompt sets, read from plain YAML or JSON files users can edit.

Two protocols. ``binary`` (HLIP's CT-RATE protocol): every finding has a negative and a positive
prompt and its score is the softmax over that pair. ``multiclass``: one prompt per class and a
softmax over all classes. Each phrase is put into every template; a class's text embedding is
the normalised mean of those prompts' normalised embeddings (as open_clip builds classifiers).

    protocol: binary
    templates: ["This study shows {}."]
    findings:
      mass: ["no mass", "a mass"]                  # [negative, positive]
      infarct: {negative: ["no infarct"], positive: ["an infarct", "an ischaemic lesion"]}

    protocol: multiclass
    templates: ["{}."]
    classes:
      glioma: ["glioma"]
      metastasis: ["brain metastases", "metastatic disease"]

Finding and class names are the label names of the studies being scored. A bare name such as
``synth_mr`` picks one of the sets shipped in ``hlip_fast/evaluation/prompts/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..files import read_config_file

PROTOCOLS = ("binary", "multiclass")
BUILTIN = Path(__file__).with_name("prompts")


@dataclass(frozen=True)
class PromptSet:
    """``options[name]`` lists the phrasings of each option: ``(negative, positive)`` for a
    binary finding, one entry for a class of a multiclass task."""

    name: str
    protocol: str
    templates: tuple[str, ...]
    options: dict[str, tuple[tuple[str, ...], ...]]

    def texts(self, phrases: tuple[str, ...]) -> list[str]:
        return [template.format(phrase) for phrase in phrases for template in self.templates]


def builtin_prompt_sets() -> list[str]:
    return sorted(p.stem for p in BUILTIN.glob("*.yaml"))


def _phrases(value, where: str) -> tuple[str, ...]:
    phrases = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else ()
    if not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
        raise ValueError(f"{where}: expected a phrase or a non-empty list of phrases, got {value!r}")
    return phrases


def _binary(name: str, value, where: str) -> tuple[tuple[str, ...], ...]:
    if isinstance(value, dict) and set(value) == {"negative", "positive"}:
        value = [value["negative"], value["positive"]]
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"{where}: finding {name!r} needs [negative, positive] or {{negative:, positive:}}")
    return tuple(_phrases(v, f"{where}: finding {name!r}") for v in value)


def _is_template(template) -> bool:
    """Text with one ``{}`` that ``str.format`` fills (``{finding}`` would raise ``KeyError``)."""
    if not isinstance(template, str) or template.count("{}") != 1:
        return False
    try:
        template.format("x")
    except (KeyError, IndexError, ValueError):
        return False
    return True


def load_prompts(source: str | Path) -> PromptSet:
    """A prompt set from a ``.yaml``/``.yml``/``.json`` file or a built-in name."""
    path = Path(source)
    if not path.suffix and not path.exists():
        path = BUILTIN / f"{source}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"no prompt file {source!r}; built-in sets: {builtin_prompt_sets()}")
    data = read_config_file(path)
    where = str(path)
    if not isinstance(data, dict) or data.get("protocol") not in PROTOCOLS:
        raise ValueError(f"{where}: needs 'protocol' set to one of {PROTOCOLS}")
    templates = tuple(data.get("templates") or ("{}",))
    if bad := [t for t in templates if not _is_template(t)]:
        raise ValueError(
            f"{where}: every template needs exactly one '{{}}' and no other braces (write '{{{{' for a "
            f"literal brace), got {bad}"
        )
    key = "findings" if data["protocol"] == "binary" else "classes"
    entries = data.get(key)
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{where}: protocol {data['protocol']!r} needs a non-empty '{key}' mapping")
    if data["protocol"] == "binary":
        options = {str(n): _binary(str(n), v, where) for n, v in entries.items()}
    else:
        if len(entries) < 2:
            raise ValueError(f"{where}: a multiclass task needs at least two classes")
        options = {str(n): (_phrases(v, f"{where}: class {n!r}"),) for n, v in entries.items()}
    return PromptSet(str(data.get("name", path.stem)), data["protocol"], templates, options)
