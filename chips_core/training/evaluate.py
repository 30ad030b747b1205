"""Evaluation of a CLIP checkpoint on target-domain pairs: retrieval recall and zero-shot accuracy.

Retrieval: image→text and text→image Recall@K over the eval set's own pairs. Identical caption strings
are one text (a label-only eval set would otherwise make every same-class caption a "wrong" answer), and
ties count in favour of the ground truth: a query's rank is the number of non-matching candidates with a
strictly higher similarity. Zero-shot classification (when at least two distinct labels are present):
each class embedding is the normalised mean of its normalised prompt embeddings over the templates
(CLIP's prompt ensembling); top-1, top-5 (with more than 5 classes) and class-balanced top-1 accuracy.
Results are stored one row per metric in `eval_results`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chips_core.workspace import catalog
from chips_core.workspace.store import Workspace, WorkspaceError

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of {label}.", "a medical image of {label}.", "{label}")
CSV_POOL_ID = -1  # eval_results.eval_pool_id for an eval set read from a CSV rather than a workspace pool


class EvalError(WorkspaceError):
    """Bad evaluation input (missing columns, unknown pool, bad template); the message names it."""


@dataclass
class EvalPairs:
    """Image references, captions and optional labels of an evaluation set."""

    refs: list[str]
    captions: list[str]
    labels: list[str | None]
    pool_id: int
    name: str


def recall_at_k(sim: np.ndarray, positive: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Recall@K of queries (rows) over candidates (columns) given a boolean mask of correct candidates.

    rank(q) = #{non-positive c : sim[q, c] > max over positives of sim[q, ·]}; hit@K iff rank < K.
    Every query must have at least one positive.
    """
    sim = np.asarray(sim, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if sim.shape != positive.shape:
        raise ValueError(f"sim {sim.shape} and positive {positive.shape} differ in shape")
    if not positive.any(axis=1).all():
        raise ValueError("every query needs at least one positive candidate")
    best_pos = np.where(positive, sim, -np.inf).max(axis=1, keepdims=True)
    rank = ((sim > best_pos) & ~positive).sum(axis=1)
    return {k: float((rank < k).mean()) for k in ks}


def retrieval_metrics(
    img: np.ndarray, txt: np.ndarray, captions: Sequence[str], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image→text and text→image Recall@K for aligned (N, D) normalised embeddings of N pairs.

    Texts are de-duplicated by caption string (the first embedding of each string is used).
    """
    codes, first = _unique_codes(captions)
    sim = img @ txt[first].T  # (N images, U unique texts)
    pos = codes[:, None] == np.arange(len(first))[None, :]
    out = {f"i2t_R@{k}": v for k, v in recall_at_k(sim, pos, ks).items()}
    out |= {f"t2i_R@{k}": v for k, v in recall_at_k(sim.T, pos.T, ks).items()}
    return out


def _unique_codes(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(code of each value, index of the first occurrence of each code), codes in first-seen order."""
    index: dict[str, int] = {}
    first: list[int] = []
    codes = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        if v not in index:
            index[v] = len(first)
            first.append(i)
        codes[i] = index[v]
    return codes, np.asarray(first, dtype=np.int64)


def zero_shot_metrics(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Top-1, class-balanced top-1 and (with more than 5 classes) top-5 accuracy of (N, C) logits."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    n_cls = logits.shape[1]
    pred = logits.argmax(axis=1)
    correct = pred == targets
    per_class = [correct[targets == c].mean() for c in range(n_cls) if (targets == c).any()]
    out = {"zeroshot_top1": float(correct.mean()), "zeroshot_balanced_top1": float(np.mean(per_class))}
    if n_cls > 5:
        # rank of the true class: #classes with a strictly higher logit (ties favour the truth, as above)
        true = logits[np.arange(len(targets)), targets][:, None]
        out["zeroshot_top5"] = float(((logits > true).sum(axis=1) < 5).mean())
    return out


def load_eval_pairs(
    ws: Workspace | None,
    source: int | str | os.PathLike,
    img_key: str = "filepath",
    caption_key: str = "title",
    label_key: str = "label",
) -> EvalPairs:
    """An eval set from a workspace pool (id or name) or a CSV/TSV file (relative paths: CSV's folder)."""
    if ws is not None and (isinstance(source, int) or not Path(source).is_file()):
        with ws.connect(read_only=True) as con:
            if isinstance(source, int):
                found = catalog.pool_row(con, source)
                row = None if found is None else (source, found[0])
            else:
                pool_id = catalog.find_pool_id(con, source)
                row = None if pool_id is None else (pool_id, source)
            if row is None:
                raise EvalError(f"no pool {source!r} in workspace {ws.root}")
            df = catalog.pairs_frame(con, row[0], ordered=True, with_ids=False)
        labels = [None if pd.isna(v) or not str(v).strip() else str(v) for v in df["label"]]
        return EvalPairs(list(df["filepath"]), list(df["caption"]), labels, int(row[0]), str(row[1]))
    from chips_core.pools.records import resolve_ref

    path = Path(source)
    if not path.is_file():
        raise EvalError(f"eval set not found: {path} (a CSV/TSV file or, with a workspace, a pool name/id)")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    for col in (img_key, caption_key):
        if col not in df.columns:
            raise EvalError(f"eval CSV {path} has no column {col!r}; columns: {list(df.columns)}")
    labels = [v.strip() or None for v in df[label_key]] if label_key in df.columns else [None] * len(df)
    refs = [resolve_ref(r, path.parent.resolve()) for r in df[img_key]]
    return EvalPairs(refs, list(df[caption_key]), labels, CSV_POOL_ID, str(path.resolve()))


def embed_pairs(loaded, pairs: EvalPairs, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image and text embeddings (float32 numpy) of every pair, in order."""
    import torch  # here, not at the top: the CLI reads DEFAULT_TEMPLATES without loading torch

    from chips_core.pools.records import load_image

    model, dev = loaded.model, loaded.device
    imgs, txts = [], []
    with torch.no_grad():
        for s in range(0, len(pairs.refs), batch_size):
            batch = torch.stack([loaded.preprocess(load_image(r)) for r in pairs.refs[s : s + batch_size]])
            imgs.append(model.encode_image(batch.to(dev), normalize=True).float().cpu())
            tokens = loaded.tokenizer(pairs.captions[s : s + batch_size]).to(dev)
            txts.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(imgs).numpy(), torch.cat(txts).numpy()


def class_embeddings(loaded, classes: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """(C, D) zero-shot classifier: normalised mean over templates of normalised prompt embeddings."""
    import torch

    out = []
    with torch.no_grad():
        for c in classes:
            prompts = [t.format(label=c) for t in templates]
            e = loaded.model.encode_text(loaded.tokenizer(prompts).to(loaded.device), normalize=True).float()
            out.append(torch.nn.functional.normalize(e.mean(dim=0), dim=-1).cpu())
    return torch.stack(out).numpy()


def evaluate(
    ws: Workspace | None,
    model: str,
    eval_source: int | str | os.PathLike,
    *,
    pretrained: str | None = None,
    device: str = "cpu",
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 64,
    cpt_run_id: int | None = None,
    img_key: str = "filepath",
    caption_key: str = "title",
    label_key: str = "label",
    store_as: str | None = None,
) -> dict[str, float]:
    """Evaluate a model (name + tag, name + checkpoint, or a checkpoint with a sidecar) on eval pairs.

    Returns {metric: value} incl. n_pairs (and n_classes with labels); with a workspace the metrics are
    stored in `eval_results` (eval_pool_id = -1 for an eval CSV) linked to `cpt_run_id`, under the
    model's identity (or `store_as`).
    """
    from chips_core.features.models import load_model

    for t in templates:
        if "{label}" not in t:
            raise EvalError(f"zero-shot template {t!r} has no {{label}} placeholder")
    pairs = load_eval_pairs(ws, eval_source, img_key, caption_key, label_key)
    if len(pairs.refs) < 2:
        raise EvalError(f"eval set {pairs.name} has {len(pairs.refs)} pairs; retrieval needs at least 2")
    loaded = load_model(model, pretrained, device=device)
    img, txt = embed_pairs(loaded, pairs, batch_size)
    metrics = {"n_pairs": float(len(pairs.refs)), **retrieval_metrics(img, txt, pairs.captions, ks)}
    labelled = [i for i, v in enumerate(pairs.labels) if v is not None]
    classes = sorted({pairs.labels[i] for i in labelled})
    if len(classes) >= 2:
        cls = class_embeddings(loaded, classes, templates)
        targets = np.asarray([classes.index(pairs.labels[i]) for i in labelled])
        metrics |= zero_shot_metrics(img[labelled] @ cls.T, targets)
        metrics["n_classes"] = float(len(classes))
    if ws is not None:
        ident = loaded.identity
        _store(ws, store_as or ident.checkpoint or ident.label(), pairs.pool_id, cpt_run_id, metrics)
    return metrics


def _store(ws: Workspace, checkpoint: str, pool_id: int, cpt_run_id: int | None, metrics: dict) -> None:
    catalog.insert_eval_results(ws, checkpoint, pool_id, cpt_run_id, metrics)


BASE = "base:"  # eval_results.checkpoint prefix of a CPT run's starting weights
COUNTS = ("n_pairs", "n_classes")  # sizes of the eval set, not metrics to compare


def evaluate_run(
    ws: Workspace, cpt_run_id: int, eval_source: int | str | os.PathLike, with_base: bool = False, **kw
) -> dict[str, float]:
    """Evaluate the final checkpoint of a finished CPT run (model name from the run's config); with
    `with_base`, also the run's starting weights on the same set (`evaluate_base`) unless already stored."""
    from chips_core.training.cpt import checkpoint_model, run_config

    info = run_config(ws, cpt_run_id)
    if info["status"] != "finished" or not info["checkpoint"]:
        raise EvalError(f"CPT run {cpt_run_id} has no final checkpoint (status {info['status']})")
    kw.setdefault("device", info["config"]["device"])
    model, pretrained = checkpoint_model(ws, cpt_run_id)
    metrics = evaluate(ws, model, eval_source, pretrained=pretrained, cpt_run_id=cpt_run_id, **kw)
    if with_base:
        stored = catalog.eval_results_of_run(ws, cpt_run_id)
        sets = stored["eval_set"].fillna("")  # "": an eval CSV
        if not (stored["checkpoint"].str.startswith(BASE) & (sets == sets.iloc[-1])).any():
            evaluate_base(ws, cpt_run_id, eval_source, **kw)
    return metrics


def evaluate_base(
    ws: Workspace, cpt_run_id: int, eval_source: int | str | os.PathLike, **kw
) -> dict[str, float]:
    """Evaluate the weights a CPT run started from (its recipe's model and pretrained) through `evaluate`,
    stored with the run as `base:<model>`: the 'before' of `compare_run`."""
    from chips_core.training.cpt import run_config

    cfg = run_config(ws, cpt_run_id)["config"]
    model, pretrained = cfg["model"], cfg.get("pretrained")
    kw.setdefault("device", cfg.get("device", "cpu"))
    label = BASE + model + (f" {pretrained}" if pretrained else "")
    return evaluate(
        ws, model, eval_source, pretrained=pretrained, cpt_run_id=cpt_run_id, store_as=label, **kw
    )


def compare_run(ws: Workspace, cpt_run_id: int) -> pd.DataFrame:
    """Before vs after of a CPT run per eval set and metric: eval_set, metric, base, trained, change
    (trained - base; NaN where one side is not evaluated). The newest result of each side counts."""
    df = catalog.eval_results_of_run(ws, cpt_run_id)
    cols = ["eval_set", "metric", "base", "trained", "change"]
    df = df[~df["metric"].isin(COUNTS)]
    if df.empty:
        return pd.DataFrame(columns=cols)
    df = df.assign(
        eval_set=df["eval_set"].fillna("(eval CSV)"),
        side=df["checkpoint"].str.startswith(BASE).map({True: "base", False: "trained"}),
    )
    wide = df.pivot_table(
        index=["eval_set", "metric"], columns="side", values="value", aggfunc="last", sort=False
    )
    wide = wide.reindex(columns=["base", "trained"]).rename_axis(columns=None).reset_index()
    wide["change"] = wide["trained"] - wide["base"]
    return wide[cols]
