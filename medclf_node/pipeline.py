"""Orchestration only: a completed series -> selection -> volume -> models -> SR/SC -> outbox.

Each stage lives in its own module (``ingest.selection``, ``ingest.volume``,
``inference``, ``reporting``); this module calls them in order, records every state change
in the store and turns failures into precise, patient-data-free reasons:

* no rule selects the series           -> ``skipped`` (reason_code ``no_rule``)
* a selected model is not loaded       -> ``failed``  (``model_unavailable``)
* the volume cannot be assembled       -> ``failed``  (the :class:`VolumeError` code)
* a header cannot be read              -> ``failed``  (``unreadable``)
* anything unexpected                  -> ``failed``  (``internal_error``), logged with traceback

Result objects are written durably under ``outbox/`` of the files directory (``store.shared_dir``,
else ``node.data_dir``) *before* they are queued,
so a crash after this point loses nothing; a crash before it re-runs the series on restart
(``Store.reset_processing_on_startup``) and produces the same UIDs.

A series re-opened by a late instance while we worked has a newer ``generation``; our
state update is then refused by the store, objects not yet queued are dropped, and the newer
generation is processed later.  Each generation's objects carry their own UIDs and version
(:class:`~medclf_node.reporting.uids.ResultVersion`, looked up in the store's ``reports``).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError

from medclf_node.config import Config
from medclf_node.domain import Image2D, ImageModelResult, ImageOutcome, ModelResult, NodeIdentity, SliceRef, Volume
from medclf_node.inference.predict import predict_series
from medclf_node.inference.predict_image import predict_images
from medclf_node.inference.registry import LoadedModel
from medclf_node.ingest.image2d import ImageError, read_image_and_header
from medclf_node.ingest.selection import Header, Selection, Skipped, header_from_dataset, select
from medclf_node.ingest.spool import write_atomic
from medclf_node.ingest.volume import VolumeError, assemble_volume
from medclf_node.redact import scrub
from medclf_node.reporting import build_sc, build_sr, result_uids, slice_info_from_volume, slice_orientation
from medclf_node.reporting.sc_image import build_image_sc
from medclf_node.reporting.sr_image import build_image_sr
from medclf_node.reporting.uids import Predecessor, ResultVersion, label_version
from medclf_node.store import ReportRecord, SeriesRow, Store
from medclf_node.store.leases import LeaseKeeper
from medclf_node.telemetry import Telemetry

log = logging.getLogger(__name__)

OUTBOX_DIRNAME = "outbox"


class ModelProvider(Protocol):
    """The loaded models by name (``inference.registry.ModelRegistry``); KeyError when absent."""

    def get(self, name: str) -> LoadedModel: ...


@dataclass(frozen=True)
class SeriesFiles:
    """One series' header datasets (no pixels): selection reads them, the SR cites them."""

    datasets: dict[Path, Dataset]
    selection_headers: list[Header]


class StageError(Exception):
    """A series-level failure with a reason code for the index."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def read_series_files(paths: Sequence[Path]) -> SeriesFiles:
    """Read each spooled file's header once, without pixels.

    Volume assembly reads geometry with its own fast header scan and then the pixels once.
    """
    datasets: dict[Path, Dataset] = {}
    sel: list[Header] = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            # Convert every element now: pydicom converts lazily, so a corrupt VR or value would
            # otherwise surface deep in reporting as an unexpected error (found by fuzzing).
            for _elem in ds.iterall():
                pass
        except (InvalidDicomError, BytesLengthException, OSError, EOFError, ValueError, NotImplementedError, KeyError,
                TypeError, OverflowError) as exc:
            raise StageError("unreadable", f"cannot read the header of {path.name}: {type(exc).__name__}") from exc
        if "SOPInstanceUID" not in ds:
            raise StageError("unreadable", f"{path.name} has no SOP Instance UID")
        datasets[path] = ds
        sel.append(header_from_dataset(path, ds))
    return SeriesFiles(datasets=datasets, selection_headers=sel)


def evidence_sources(volume: Volume, datasets: dict[Path, Dataset]) -> tuple[list[Dataset], dict[str, int]]:
    """Source datasets in slice order, one per SOP instance, and each UID's position.

    Then every other image whose pixels went into the volume (``Volume.sources``: for a
    coronal/sagittal acquisition the axial slices name one image each, but all were evaluated).
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets.values()}
    order: dict[str, int] = {}
    sources: list[Dataset] = []
    for ref in (*volume.slice_refs, *volume.sources):
        if ref.sop_instance_uid not in order:
            order[ref.sop_instance_uid] = len(sources)
            sources.append(by_uid[ref.sop_instance_uid])
    return sources, order


def _instance_number(ds: Dataset) -> int:
    try:
        return int(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        return 0


def image_result_details(result: ImageModelResult) -> dict[str, object]:
    """What the index keeps of an image model's result (no patient data: codes, scores, UIDs)."""

    def outcome(o: ImageOutcome) -> dict[str, object]:
        d: dict[str, object] = {"positive": o.positive}
        if o.ref is not None:
            d["sop_instance_uid"] = o.ref.sop_instance_uid
        if o.kind == "multiclass":
            d["class"] = o.predicted_class.code.meaning
            d["probabilities"] = [round(c.probability, 6) for c in o.classes]
        else:
            d["findings"] = {f.code.meaning: round(f.probability, 6) for f in o.findings}
        return d

    return {"task": result.kind, "finding": result.concept.meaning, "summary": outcome(result.summary),
            "images": [outcome(o) for o in result.images], "key_image": result.key_image}


def encode(ds: Dataset) -> bytes:
    """A dataset as Part 10 file bytes (preamble, file meta, dataset)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Pipeline:
    """Processes one claimed series at a time; plain calls, no threads (see :class:`WorkerPool`)."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        models: ModelProvider,
        *,
        on_queued: Callable[[], None] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.models = models
        self.on_queued = on_queued or (lambda: None)
        self.telemetry = telemetry or Telemetry.disabled()
        self.identity = NodeIdentity(
            ae_title=cfg.node.ae_title,
            device_name=cfg.node.ae_title,
            institution_name=cfg.results.institution_name,
        )
        self.files_dir = cfg.files_dir()
        self.outbox_dir = self.files_dir / OUTBOX_DIRNAME
        self.durable = cfg.node.durable_writes

    # --- one series ------------------------------------------------------------------------
    def process(self, row: SeriesRow) -> str:
        """Run the whole chain for a claimed (``processing``) series; returns its final state."""
        uid, gen = row.series_uid, row.generation
        timings: dict[str, float] = {}
        if row.completed_at is not None:
            timings["completion_wait"] = round(max(0.0, row.completed_at - row.last_at), 3)
        t0 = time.perf_counter()
        try:
            state, code, text, rule = self._run(row, timings)
        except StageError as exc:
            state, code, text, rule = "failed", exc.code, exc.message, None
            log.warning("series %s failed: %s", uid, scrub(str(exc)))
        except Exception as exc:  # never take the worker down; the reason is recorded
            state, code, text, rule = "failed", "internal_error", f"{type(exc).__name__}: {exc}"[:500], None
            log.exception("series %s: unexpected error", uid)
        timings["total"] = round(time.perf_counter() - t0, 3)
        text = scrub(text) if text else text  # exception texts quote values; no patient data in the index or audit
        changed = self.store.set_series_state(
            uid, state, code, text, generation=gen, rule=rule, timings=timings,  # type: ignore[arg-type]
            holder=row.worker,
        )
        if not changed:
            log.info("series %s was re-opened by a late instance (or its lease taken over) while processing; "
                     "the newer claim decides", uid)
        else:
            log.info("series %s -> %s%s (%.2f s)", uid, state, f" [{code}]" if code else "", timings["total"])
            self._observe(row, state, code, text, rule, timings)
        if state == "reported":
            self.on_queued()
        return state

    def _observe(self, row: SeriesRow, state: str, code: str | None, text: str | None, rule: str | None,
                 timings: dict[str, float]) -> None:
        tm = self.telemetry
        with tm.guard("pipeline"):
            for stage in ("volume", "inference", "report"):
                spent = sum(v for k, v in timings.items() if k == stage or k.startswith(f"{stage}:"))
                if spent:
                    tm.metrics.observe_stage(stage, spent)
            if state in ("skipped", "failed"):
                tm.audit.series("skipped" if state == "skipped" else "failed", series_uid=row.series_uid,
                                study_uid=row.study_uid, reason_code=code, reason=text, rule=rule,
                                generation=row.generation)
            for r in self.store.results(row.series_uid) if state == "reported" else []:
                tm.audit.model_run(series_uid=row.series_uid, study_uid=row.study_uid, model=r.model_name,
                                   version=r.model_version, score=r.probability, positive=r.positive,
                                   seconds=r.timings.get("inference"), generation=row.generation)

    def _run(self, row: SeriesRow, timings: dict[str, float]) -> tuple[str, str | None, str | None, str | None]:
        uid, gen = row.series_uid, row.generation
        paths = self.store.series_paths(uid)
        if not paths:
            raise StageError("no_instances", "the series has no stored instances")
        t = time.perf_counter()
        files = read_series_files(paths)
        choice = select(files.selection_headers, self.cfg.effective_rules())
        timings["headers"] = round(time.perf_counter() - t, 3)
        if isinstance(choice, Skipped):
            return "skipped", "no_rule", choice.reason, None
        predictors = self._predictors(choice)
        image_predictors = [(n, p) for n, p in predictors if p.manifest.input.kind == "image"]
        if image_predictors:
            self._run_images(row, choice, image_predictors, timings)
        predictors = [(n, p) for n, p in predictors if p.manifest.input.kind != "image"]
        if not predictors:
            return "reported", None, None, choice.rule
        t = time.perf_counter()
        try:
            volume = assemble_volume(list(choice.paths), self.cfg.volume, limits=self.cfg.limits)
        except VolumeError as exc:
            raise StageError(exc.code, exc.message) from exc
        timings["volume"] = round(time.perf_counter() - t, 3)
        sources, position = evidence_sources(volume, {p: files.datasets[p] for p in choice.paths})
        for name, predictor in predictors:
            t = time.perf_counter()
            result = predict_series(predictor, volume)
            timings[f"inference:{name}"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            self._report(row, volume, sources, position, result)
            timings[f"report:{name}"] = round(time.perf_counter() - t, 3)
            self.store.record_result(
                uid,
                result.model_name,
                result.model_version,
                result.probability,
                result.positive,
                generation=gen,
                key_slice_index=result.key_slice_index,
                timings={"inference": timings[f"inference:{name}"], "report": timings[f"report:{name}"]},
                details={
                    "threshold": result.threshold,
                    "finding": result.finding.meaning,
                    "volume_shape": list(volume.shape),
                    "volume_notes": list(volume.notes),
                },
            )
        return "reported", None, None, choice.rule

    def _run_images(self, row: SeriesRow, choice: Selection, predictors: list[tuple[str, LoadedModel]],
                    timings: dict[str, float]) -> None:
        """Image models: each selected instance is one 2D image, scored on its own and summarised."""
        t = time.perf_counter()
        images: list[Image2D] = []
        headers: list[Dataset] = []
        for path in choice.paths:
            try:
                image, header = read_image_and_header(path, self.cfg.limits)
            except ImageError as exc:
                raise StageError(exc.code, exc.message) from exc
            images.append(image)
            headers.append(header)
        order = sorted(range(len(images)), key=lambda i: (_instance_number(headers[i]), images[i].ref.sop_instance_uid))
        images, headers = [images[i] for i in order], [headers[i] for i in order]
        timings["images"] = round(time.perf_counter() - t, 3)
        for name, predictor in predictors:
            t = time.perf_counter()
            result = predict_images(predictor, images)
            timings[f"inference:{name}"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            objects: list[tuple[Literal["SR", "SC"], Dataset, ResultVersion]] = []
            if self.cfg.results.send_sr:
                v = self._version(row, result, "SR")
                objects.append(("SR", build_image_sr(headers, result, self.identity, version=v,
                                                     series_number=self.cfg.results.sr_series_number), v))
            if self.cfg.results.send_sc:
                v = self._version(row, result, "SC")
                k = result.key_image
                objects.append(("SC", build_image_sc(headers[k], images[k], result, self.identity,
                                                     generation=v.generation,
                                                     series_number=self.cfg.results.sc_series_number), v))
            self._queue(row, result.model_name, objects)
            timings[f"report:{name}"] = round(time.perf_counter() - t, 3)
            summary = result.summary
            self.store.record_result(
                row.series_uid, result.model_name, result.model_version, summary.score, summary.positive,
                generation=row.generation, key_slice_index=result.key_image,
                timings={"inference": timings[f"inference:{name}"], "report": timings[f"report:{name}"]},
                details=image_result_details(result),
            )

    def _predictors(self, choice: Selection) -> list[tuple[str, LoadedModel]]:
        out = []
        for name in choice.models:
            try:
                out.append((name, self.models.get(name)))
            except KeyError:
                raise StageError(
                    "model_unavailable", f"rule {choice.rule!r} names model {name!r}, which is not loaded"
                ) from None
        return out

    def _report(
        self,
        row: SeriesRow,
        volume: Volume,
        sources: list[Dataset],
        position: dict[str, int],
        result: ModelResult,
    ) -> None:
        """Build SR and SC, write them durably, queue them for every destination."""
        key_ref: SliceRef = volume.slice_refs[result.key_slice_index]
        objects: list[tuple[str, Dataset, ResultVersion]] = []
        if self.cfg.results.send_sr:
            v = self._version(row, result, "SR")
            objects.append(("SR", build_sr(sources, result, self.identity, key_ref=key_ref, version=v,
                                           series_number=self.cfg.results.sr_series_number, volume=volume), v))
        if self.cfg.results.send_sc:
            key_source = sources[position[key_ref.sop_instance_uid]]
            key_hu = volume.array[result.key_slice_index]
            v = self._version(row, result, "SC")
            objects.append(
                ("SC", build_sc(key_source, key_hu, result, self.identity, key_frame_number=key_ref.frame_number,
                                orientation=slice_orientation(volume.affine), generation=v.generation,
                                series_number=self.cfg.results.sc_series_number,
                                slice_info=slice_info_from_volume(volume, result.key_slice_index)), v)
            )
        self._queue(row, result.model_name, objects)

    def _queue(self, row: SeriesRow, model_name: str, objects: Sequence[tuple[str, Dataset, ResultVersion]]) -> None:
        """Write result objects durably and queue them for every destination."""
        folder = self.outbox_dir / row.series_uid
        folder.mkdir(parents=True, exist_ok=True)
        for kind, ds, v in objects:
            label_version(ds, v)
            sop_uid = str(ds.SOPInstanceUID)
            record = ReportRecord(sop_uid, row.series_uid, model_name, kind, row.generation, v.number,
                                  str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID),
                                  v.predecessor.sop_instance_uid if v.predecessor else None)
            if not self.store.record_report(record, generation=row.generation):
                log.info("series %s: generation %d was re-opened by late instances; its %s is not sent",
                         row.series_uid, row.generation, kind)
                continue
            path = folder / f"{sop_uid}.dcm"
            write_atomic(path, encode(ds), durable=self.durable)
            rel = path.relative_to(self.files_dir).as_posix()
            for dest in self.cfg.results.destinations:
                # same UID = same generation = same content: what was sent stays sent
                self.store.enqueue_outbox(sop_uid, row.series_uid, dest, kind, rel)  # type: ignore[arg-type]

    def _version(self, row: SeriesRow, result: ModelResult | ImageModelResult,
                 kind: Literal["SR", "SC"]) -> ResultVersion:
        """The version the ``kind`` object of this generation is (the same again on a re-run)."""
        uid = result_uids(row.series_uid, result.model_name, result.model_version,
                          "sr" if kind == "SR" else "sc", generation=row.generation).sop_instance_uid
        number, prev = self.store.report_version(row.series_uid, result.model_name, kind, uid)
        pre = None if prev is None else Predecessor(prev.study_uid, prev.result_series_uid, prev.sop_class_uid,
                                                    prev.sop_instance_uid, prev.version)
        return ResultVersion(row.generation, number, pre)


class WorkerPool:
    """``pipeline.workers`` threads that claim completed series and run the pipeline on them."""

    def __init__(self, pipeline: Pipeline, *, workers: int, poll_seconds: float, wake: threading.Event) -> None:
        self.pipeline = pipeline
        self.leases = LeaseKeeper(pipeline.store, pipeline.cfg.store.lease_seconds)
        self.n = workers
        self.poll = poll_seconds
        self.wake = wake
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.leases.start()
        for i in range(self.n):
            t = threading.Thread(target=self._run, args=(f"worker-{i}",), name=f"pipeline-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        for t in self._threads:
            t.join(timeout=60)
        self._threads.clear()
        self.leases.stop()

    def run_until_idle(self, worker: str = "inline") -> int:
        """Process every complete series now, in this thread (tests, `demo`); returns how many."""
        n = 0
        self.leases.sweep(every_seconds=0)
        while (row := self.pipeline.store.claim_next_complete(worker)) is not None:
            with self.leases.hold(row):
                self.pipeline.process(row)
            n += 1
        return n

    def _run(self, name: str) -> None:
        while not self._stop.is_set():
            try:
                self.leases.sweep()
                row = self.pipeline.store.claim_next_complete(name)
            except Exception:
                log.exception("cannot claim work from the store; retrying")
                row = None
            if row is None:
                self.wake.wait(self.poll)
                self.wake.clear()
                continue
            with self.leases.hold(row):
                self.pipeline.process(row)
