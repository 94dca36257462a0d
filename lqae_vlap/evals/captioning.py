"""COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE) through pycocoevalcap.

The scorers are the maintained pycocoevalcap package (pip: ``pycocoevalcap``, the Python 3 port
of the coco-caption code used by every COCO/NoCaps captioning paper), not rewrites. Its "CIDEr"
is CIDEr-D (n = 1..4, Gaussian length penalty sigma 6, clipped counts, x10), the variant VLAP
reports; document frequencies come from the evaluated references, so scores depend on the whole
evaluated set (a one-image corpus gets CIDEr 0 because every idf is log(1) = 0).

Java: the official pipeline tokenizes with Stanford's PTBTokenizer and METEOR/SPICE are Java
programs. Without a working ``java`` we still report BLEU, ROUGE-L and CIDEr-D, computed on
captions tokenized by ``simple_tokenize`` (lowercase, punctuation -> space, split on whitespace),
which differs from PTB on clitics and some symbols ("dog's" -> "dog s" instead of "dog 's"), so
those numbers are close to but not exactly the official ones; the result says which tokenizer ran.

SPICE needs Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads from nlp.stanford.edu on first
use; we never trigger that download (it would hang or fail offline): if the jars are not already
in ``pycocoevalcap/spice/lib`` SPICE is skipped with the reason and the fix. SPICE 1.0 is also known
to fail on Java > 8 (its LMDB cache); a failed run is reported as skipped, not raised.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import string
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

ALL_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
DEFAULT_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
JAVA_METRICS = ("METEOR", "SPICE")
PIP_REQUIREMENT = "pycocoevalcap>=1.2"
_SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})


def _import_pycocoevalcap():
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as e:
        raise ImportError(f"caption metrics need pycocoevalcap: pip install '{PIP_REQUIREMENT}' "
                          "(also in the test extra: pip install -e .[test])") from e
    return pycocoevalcap


def java_available() -> tuple[bool, str]:
    """(True, version line) if ``java -version`` runs, else (False, why)."""
    java = shutil.which("java")
    if java is None:
        return False, "no 'java' on PATH (install a JRE, e.g. apt-get install default-jre-headless)"
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"'java -version' failed: {e}"
    if proc.returncode != 0:
        return False, f"'java -version' exited with {proc.returncode}: {proc.stderr.strip()[:200]}"
    return True, (proc.stderr or proc.stdout).strip().splitlines()[0]


def spice_jars_missing() -> list[str]:
    """Paths of the CoreNLP jars SPICE needs that are not installed (empty = SPICE can run)."""
    pkg = _import_pycocoevalcap()
    lib = os.path.join(list(pkg.__path__)[0], "spice", "lib")
    return [os.path.join(lib, j) for j in _SPICE_CORENLP_JARS
            if not os.path.exists(os.path.join(lib, j))]


def references(example: Mapping[str, Any]) -> list[str]:
    """The reference captions of an example: 'references' (COCO: ~5) or its one 'caption'."""
    refs = example.get("references")
    if refs is None:
        if "caption" not in example:
            raise ValueError("an evaluation example needs 'references' (list of captions) or "
                             f"'caption'; got keys {sorted(example)}")
        refs = [example["caption"]]
    return [str(r) for r in refs]


def simple_tokenize(caption: str) -> str:
    """Java-free stand-in for the PTB tokenizer: lowercase, punctuation -> space, single spaces."""
    return " ".join(caption.lower().translate(_PUNCT_TABLE).split())


def _check_inputs(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]],
                  metrics: Sequence[str]) -> None:
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown caption metrics {unknown}; choose from {ALL_METRICS}")
    if not predictions:
        raise ValueError("predictions is empty; give image_id -> generated caption")
    if set(predictions) != set(references):
        only_p = sorted(set(predictions) - set(references), key=str)[:5]
        only_r = sorted(set(references) - set(predictions), key=str)[:5]
        raise ValueError(f"predictions and references must have the same image ids; only in "
                         f"predictions: {only_p}, only in references: {only_r}")
    for k, v in predictions.items():
        if not isinstance(v, str):
            raise ValueError(f"prediction of image {k!r} must be one string, got "
                             f"{type(v).__name__}")
    for k, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references of image {k!r} must be a non-empty list of strings")


@contextlib.contextmanager
def _child_stderr_kept():
    """Collects what child processes write to file descriptor 2 meanwhile (pycocoevalcap's PTB
    tokenizer lets Java print "PTBTokenizer tokenized N tokens at ..." to ours: two such lines
    per scored decoding on the console), and reprints it only if the block raises."""
    import tempfile  # noqa: PLC0415

    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (some embedded interpreters): leave it alone
        yield
        return
    with tempfile.TemporaryFile() as buffer:
        os.dup2(buffer.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            buffer.seek(0)
            os.write(2, buffer.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _tokenize(captions: Mapping[Any, Sequence[str]], use_ptb: bool) -> dict[Any, list[str]]:
    if use_ptb:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        with _child_stderr_kept():
            return PTBTokenizer().tokenize({k: [{"caption": c} for c in v]
                                            for k, v in captions.items()})
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}


def caption_metrics(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]],
                    metrics: Sequence[str] = DEFAULT_METRICS,
                    use_java: bool | None = None,
                    groups: Mapping[str, Sequence[Any]] | None = None) -> dict[str, Any]:
    """Corpus-level COCO caption metrics, of all images and optionally of subsets of them.

    Args:
      predictions: image_id -> the generated caption (one per image).
      references: image_id -> the reference captions (COCO: ~5), same ids as predictions.
      metrics: names from ALL_METRICS ('BLEU-1'..'BLEU-4', 'METEOR', 'ROUGE-L', 'CIDEr' (= CIDEr-D),
        'SPICE').
      use_java: None = use Java when it works; False = force the Java-free path (simple tokenizer,
        no METEOR/SPICE); True = require Java (error if missing).
      groups: name -> image ids (e.g. NoCaps' domains); each group is scored as a corpus of its
        own, as if only its images had been evaluated: CIDEr-D's document frequencies then come
        from that group's references alone (what NoCaps' official per-domain scores do). The
        captions are tokenized once and one METEOR process serves every group.

    Returns:
      {'scores': {metric: float} as pycocoevalcap reports them (papers' tables print 100 x
      score, e.g. CIDEr-D 1.2 -> "120"), 'skipped': {name: reason} for every requested metric not
      computed (and 'PTBTokenizer' if it failed and simple_tokenize was used instead),
      'tokenizer': 'ptb' | 'simple'}, and with ``groups`` 'groups': {name: {metric: float}}.
    """
    _check_inputs(predictions, references, metrics)
    for name, ids in (groups or {}).items():
        unknown = [k for k in ids if k not in predictions]
        if not ids or unknown:
            raise ValueError(f"caption group {name!r} must be a non-empty list of predicted image "
                             f"ids; not predicted: {unknown[:5]}")
    _import_pycocoevalcap()
    ok, java_msg = java_available()
    if use_java and not ok:
        raise RuntimeError(f"use_java=True but Java does not work: {java_msg}")
    java = ok if use_java is None else bool(use_java)
    skipped: dict[str, str] = {}
    if not java:
        reason = java_msg if not ok else "use_java=False"
        for m in metrics:
            if m in JAVA_METRICS:
                skipped[m] = f"needs Java: {reason}"

    keys = list(predictions)
    tokenizer = "ptb" if java else "simple"
    try:
        gts = _tokenize({k: list(references[k]) for k in keys}, java)
        res = _tokenize({k: [predictions[k]] for k in keys}, java)
    except (OSError, subprocess.SubprocessError) as e:
        # e.g. pycocoevalcap's folder is read-only (the PTB wrapper writes a temp file there).
        tokenizer = "simple"
        gts = _tokenize({k: list(references[k]) for k in keys}, False)
        res = _tokenize({k: [predictions[k]] for k in keys}, False)
        skipped["PTBTokenizer"] = f"PTB tokenizer failed ({e}); used simple_tokenize"

    if "SPICE" in metrics and "SPICE" not in skipped:
        missing = spice_jars_missing()
        if missing:
            skipped["SPICE"] = (f"Stanford CoreNLP jars missing ({', '.join(missing)}); "
                                "pycocoevalcap would download them from nlp.stanford.edu, which "
                                "we never do implicitly. With network, run once: python -c "
                                "'from pycocoevalcap.spice.get_stanford_models import "
                                "get_stanford_models as g; g()'")
    meteor = _Meteor() if "METEOR" in metrics and "METEOR" not in skipped else None
    try:
        subsets = {None: keys, **{name: list(ids) for name, ids in (groups or {}).items()}}
        scored = {name: _score({k: gts[k] for k in ids}, {k: res[k] for k in ids}, metrics,
                               skipped, meteor) for name, ids in subsets.items()}
    finally:
        if meteor is not None:
            meteor.close()
    out = {"scores": scored.pop(None), "skipped": skipped, "tokenizer": tokenizer}
    if groups is not None:
        out["groups"] = scored
    return out


def _score(gts: dict[Any, list[str]], res: dict[Any, list[str]], metrics: Sequence[str],
           skipped: dict[str, str], meteor: _Meteor | None) -> dict[str, float]:
    """The requested metrics of one corpus of tokenized captions; a SPICE run that fails is
    recorded in ``skipped``."""
    scores: dict[str, float] = {}
    bleu_wanted = [m for m in metrics if m.startswith("BLEU-")]
    if bleu_wanted:
        from pycocoevalcap.bleu.bleu import Bleu

        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram counts
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for m in bleu_wanted:
            scores[m] = float(bleu[int(m[-1]) - 1])
    if "ROUGE-L" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics:
        from pycocoevalcap.cider.cider import Cider

        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if meteor is not None:
        scores["METEOR"] = meteor.score(gts, res)
    if "SPICE" in metrics and "SPICE" not in skipped:
        try:
            from pycocoevalcap.spice.spice import Spice

            scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            skipped["SPICE"] = f"SPICE run failed ({e}); SPICE 1.0 needs Java 8"
    return {m: scores[m] for m in metrics if m in scores}


class _Meteor:
    """One METEOR JVM (it loads the paraphrase table: ~10-20 s) for several corpora."""

    def __init__(self) -> None:
        from pycocoevalcap.meteor.meteor import Meteor

        self.scorer = Meteor()

    def score(self, gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> float:
        return float(self.scorer.compute_score(gts, res)[0])

    def close(self) -> None:
        # pycocoevalcap only stops the JVM in __del__; stop it now so no process outlives us.
        p = self.scorer.meteor_p
        p.stdin.close()
        p.kill()
        p.wait()
