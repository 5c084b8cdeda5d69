"""The node's one configuration object, read from a TOML file and validated at start-up.

Every option has a default and a one-line description (the README's configuration reference
is generated from these descriptions: ``medclf-node config-check --print-defaults``).
Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, no control chars

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS_DIR = REPO_ROOT / "models"


class ConfigError(ValueError):
    """A configuration problem, worded for an admin: which key, what is wrong, what to do."""


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(value) or len(value) > 16:
        raise ValueError(
            "an AE title is 1-16 characters of printable ASCII without backslash, e.g. \"MEDCLF\""
        )
    return stripped


AETitle = Annotated[str, Field(min_length=1, max_length=16)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Section):
    ae_title: AETitle = Field("MEDCLF", description="AE title this node answers to (called AE).")
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on. Loopback by default; use 0.0.0.0 to accept from the network.",
    )
    port: int = Field(11112, ge=0, le=65535, description="DICOM listening port (0 picks a free port).")
    data_dir: Path = Field(Path("var"), description="Spool, SQLite index and outbox; relative to the config file.")
    max_pdu: int = Field(
        0, ge=0, description="Maximum PDU size we accept, in bytes; 0 means unlimited (fastest)."
    )
    durable_writes: bool = Field(
        True,
        description="fsync every received instance (file, directory, index) before answering Success; "
        "false is faster and survives a crash of the node process, but not a power loss.",
    )
    require_called_ae_title: bool = Field(
        True, description="Reject associations whose called AE title is not node.ae_title."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))


def _check_destination_name(kind: str, v: str) -> str:
    """Peer and folder names share one namespace (results.destinations) with the word "sender"."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v) or v == "sender":
        raise ValueError(f'a {kind} name is 1-64 of A-Z a-z 0-9 _ . - and may not be "sender"')
    return v


class PeerSection(_Section):
    name: str = Field(description="Name used to refer to this peer elsewhere in the config.")
    ae_title: AETitle = Field(description="The peer's AE title.")
    host: str = Field(description="The peer's host name or address.")
    port: int = Field(ge=1, le=65535, description="The peer's DICOM port.")
    tls: bool = Field(False, description="Associate with this peer over TLS (certificates from [tls]).")

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    _name = field_validator("name")(classmethod(lambda cls, v: _check_destination_name("peer", v)))


class FolderSection(_Section):
    """A directory that results can be sent to like a peer (local inspection, auditing, a file drop)."""

    name: str = Field(description="Name used in results.destinations.")
    path: Path = Field(description="Directory the result objects are written to; relative to the config file.")
    png: bool = Field(True, description="Also write each Secondary Capture key image as a PNG beside it.")

    _name = field_validator("name")(classmethod(lambda cls, v: _check_destination_name("folder", v)))


class AcceptSection(_Section):
    calling_ae_titles: list[str] = Field(
        default_factory=list,
        description='Calling AE titles allowed to associate; ["*"] accepts any (explicit opt-in). '
        "Empty means: the AE titles of all [[peers]].",
    )

    @field_validator("calling_ae_titles")
    @classmethod
    def _titles(cls, v: list[str]) -> list[str]:
        if "*" in v:
            if len(v) != 1:
                raise ValueError('use either ["*"] alone or a list of AE titles, not both')
            return v
        return [_check_ae_title(t) for t in v]


class CompletionSection(_Section):
    on_release: bool = Field(
        True, description="A series is complete when the association that sent it is released."
    )
    quiet_seconds: float = Field(
        10.0, gt=0, description="...or when no instance of it arrived for this many seconds, unless the "
        "association that sent it was aborted (see quiet_after_abort)."
    )
    max_wait_seconds: float = Field(
        600.0, gt=0, description="...or at the latest this long after its first instance arrived (the first "
        "late instance, for a re-opened series). Also how long a series whose sending association was aborted "
        "(A-ABORT, dropped connection, node stopped) waits for a clean release of an association carrying it."
    )
    quiet_after_abort: bool = Field(
        False, description="Let the quiet timer complete a series whose sending association was aborted; "
        "for senders that always end with A-ABORT instead of A-RELEASE. Off: such a series waits for a "
        "clean release or max_wait_seconds, so a partial send is not reported before the sender re-sends it."
    )
    late_instances: Literal["reprocess", "ignore"] = Field(
        "reprocess",
        description="An instance arriving after its series completed is always stored; 'reprocess' "
        "re-opens the series and sends a new result version (new UIDs; the SR names the one it replaces "
        "in its Predecessor Documents Sequence), 'ignore' only records it.",
    )


class ResultsSection(_Section):
    destinations: list[str] = Field(
        default_factory=lambda: ["sender"],
        description='Where SR and SC results go: peer names, [[folders]] names, or "sender" (the peer whose AE '
        "title sent the series).",
    )
    send_sr: bool = Field(True, description="Send a TID 1500 Comprehensive 3D SR.")
    send_sc: bool = Field(True, description="Send a Secondary Capture key image.")
    institution_name: str | None = Field(None, description="Put into the result objects' InstitutionName.")
    sr_series_number: int = Field(
        9901, ge=0, le=2**31 - 1, description="SeriesNumber of the SR series (viewers sort series by it)."
    )
    sc_series_number: int = Field(9902, ge=0, le=2**31 - 1, description="SeriesNumber of the key image series.")


class DispatchSection(_Section):
    max_attempts: int = Field(8, ge=1, description="Send attempts per object before it is dead-lettered.")
    initial_backoff_seconds: float = Field(2.0, gt=0, description="Delay before the first retry.")
    max_backoff_seconds: float = Field(300.0, gt=0, description="Upper bound of the exponential backoff.")
    timeout_seconds: float = Field(30.0, gt=0, description="Network timeout of one send.")


class VolumeSection(_Section):
    uneven_spacing: Literal["resample", "refuse"] = Field(
        "resample", description="Slices unevenly spaced or with gaps: resample onto a regular grid, or refuse."
    )
    spacing_tolerance: float = Field(
        0.1, gt=0, description="Relative deviation of a slice gap from the median before it counts as uneven."
    )
    max_gap_slices: float = Field(
        3.0, gt=1, description="A gap wider than this many median spacings is refused even when resampling."
    )
    gantry_tilt: Literal["resample", "refuse"] = Field(
        "resample", description="Gantry-tilted (sheared) series: resample onto an orthogonal grid, or refuse."
    )
    min_slices: int = Field(1, ge=1, description="Fewer slices than this: refuse.")


class RuleSection(_Section):
    """One series selection rule. All given criteria must match; omitted criteria match anything."""

    name: str = Field(description="Rule name, shown in logs and `jobs`.")
    models: list[str] = Field(description="Names of the models (manifest `name`) to run on matching series.")
    modality: list[str] = Field(default_factory=lambda: ["CT"], description="Allowed Modality values.")
    sop_class_uids: list[str] = Field(
        default_factory=list, description="Allowed SOP Class UIDs (empty: any image storage class)."
    )
    image_type_includes: list[str] = Field(
        default_factory=list, description="ImageType values that must all be present, e.g. [\"AXIAL\"]."
    )
    image_type_excludes: list[str] = Field(
        default_factory=lambda: ["LOCALIZER"],
        description="Instances whose ImageType contains any of these are dropped from the series.",
    )
    slice_thickness_mm: tuple[float, float] | None = Field(
        None, description="Allowed [min, max] SliceThickness in mm."
    )
    min_slices: int = Field(1, ge=1, description="Minimum number of (kept) slices.")
    body_part_examined: list[str] = Field(
        default_factory=list, description="Allowed BodyPartExamined values (empty: any, case-insensitive)."
    )
    series_description_regex: str | None = Field(
        None, description="Python regex searched in SeriesDescription (case-insensitive)."
    )
    laterality: list[str] = Field(
        default_factory=list, description="Allowed laterality of each image: ImageLaterality, else the series' "
        "Laterality; values R, L, B (both), U (unpaired); empty: any (2D studies, e.g. [\"R\", \"L\"] for fundus).",
    )

    @field_validator("laterality")
    @classmethod
    def _laterality(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if x.strip().upper() not in ("R", "L", "B", "U")]
        if bad:
            raise ValueError(f"laterality values are R, L, B or U, got {bad}")
        return [x.strip().upper() for x in v]

    @field_validator("series_description_regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return v

    @field_validator("slice_thickness_mm")
    @classmethod
    def _range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (0 <= v[0] <= v[1]):
            raise ValueError("give [min, max] with 0 <= min <= max")
        return v


class ModelsSection(_Section):
    directory: Path = Field(
        DEFAULT_MODELS_DIR, description="Directory holding one sub-directory per model with manifest.json."
    )
    enabled: list[str] = Field(
        default_factory=list, description="Model names to load; empty: every model the rules name."
    )
    default_model: str = Field(
        "nodule-2p5d-int8", description="Model used by the built-in rule when [[rules]] is absent."
    )
    threads: int = Field(2, ge=1, description="CPU threads per inference (LiteRT XNNPACK / TensorFlow).")


class PipelineSection(_Section):
    enabled: bool = Field(
        True,
        description="Run models on completed series. false = store only: series wait in state 'complete' "
        "and are processed once the pipeline is enabled again (no model needs to be installed).",
    )
    workers: int = Field(1, ge=1, description="Series processed in parallel.")
    poll_seconds: float = Field(0.5, gt=0, description="How often workers look for completed series.")


class MetricsSection(_Section):
    enabled: bool = Field(True, description="Serve Prometheus /metrics plus /healthz and /readyz over HTTP.")
    host: str = Field(
        "127.0.0.1",
        description="Address of the metrics/health HTTP server. Loopback by default; 0.0.0.0 for a scraper "
        "or probe on another host (e.g. in a container).",
    )
    port: int = Field(
        9108, ge=0, le=65535, description="Port of the metrics/health HTTP server (0 picks a free port)."
    )


class AuditSection(_Section):
    enabled: bool = Field(
        True, description="Append an audit trail (JSON lines; UIDs and AE titles, never patient names or IDs)."
    )
    path: Path = Field(Path("audit.jsonl"), description="Audit log file; relative to node.data_dir.")
    fsync: bool = Field(
        True,
        description="fsync after every audit line (survives power loss; ~8 ms per line, and lines are written "
        "per association and per series, never per instance).",
    )


class RetentionSection(_Section):
    spool_days: float = Field(
        7.0, gt=0, description="Received instances of finished series are deleted after this many days."
    )
    delete_after_sent: bool = Field(
        True, description="Delete a series' received instances as soon as all its results were sent."
    )
    min_free_disk_mb: int = Field(
        1024, ge=0, description="Below this much free space in node.data_dir, new C-STOREs get 0xA700 "
        "(out of resources) instead of filling the disk; 0 disables the check.",
    )


class LimitsSection(_Section):
    """Resource limits, so that no peer (broken or hostile) can exhaust the node."""

    max_associations: int = Field(
        32, ge=1, description="Concurrent associations; one more is rejected at A-ASSOCIATE with "
        "'local limit exceeded' (transient, the sender may retry later). Only connections that sent a complete "
        "A-ASSOCIATE-RQ count; connections still waiting for one hold no slot and no thread.",
    )
    max_associations_per_host: int = Field(
        16, ge=1, description="Concurrent associations from one calling IP address; one more is rejected with "
        "'local limit exceeded', so one peer cannot take every slot. Set to max_associations to disable.",
    )
    max_associations_per_ae: int = Field(
        16, ge=1, description="Concurrent associations with one calling AE title; one more is rejected with "
        "'local limit exceeded'. Set to max_associations to disable.",
    )
    artim_timeout_seconds: float = Field(
        30.0, gt=0, description="ARTIM timer (PS3.8, as DCMTK's 30 s): a connection that has not sent a complete "
        "A-ASSOCIATE-RQ (TLS handshake included) within this time is closed; never longer than "
        "idle_timeout_seconds. A connection that closes or sends anything else ends at once.",
    )
    max_pending_connections: int = Field(
        512, ge=1, description="Connections waiting for their A-ASSOCIATE-RQ (one file descriptor each, no "
        "thread); past this the oldest waiting connection of the host with the most of them is closed.",
    )
    max_associate_rq_bytes: int = Field(
        256 * 1024, ge=1024, description="Largest A-ASSOCIATE-RQ PDU accepted; a longer announced length is "
        "answered with A-ABORT before any of it is read.",
    )
    idle_timeout_seconds: float = Field(
        60.0, gt=0, description="An association that sends nothing for this long is aborted (A-ABORT); "
        "also the time a peer gets to answer an A-ASSOCIATE or a DIMSE message.",
    )
    max_instance_bytes: int = Field(
        1 << 30, ge=1, description="Largest encoded instance accepted; larger ones get C-STORE status "
        "0xA700 (refused: out of resources) and are not stored, nor held in memory past this size (an unusual "
        "request that pynetdicom decodes itself gets an A-ABORT instead).",
    )
    max_instances_per_series: int = Field(
        10000, ge=1, description="Instances stored per series; further new instances get 0xA700.",
    )
    max_frame_pixels: int = Field(
        4096 * 4096, ge=1, description="Rows x Columns of one frame. Checked from the header before any "
        "decoding: at intake (0xA700) and again before the volume is assembled (series refused, 'too_large').",
    )
    max_series_voxels: int = Field(
        1 << 30, ge=1, description="Rows x Columns x frames of one instance (intake) and of a whole series "
        "(volume stage); a float32 volume takes 4 bytes per voxel.",
    )


class TlsSection(_Section):
    """DICOM TLS (PS3.15 B.1) for the listener and for outgoing associations to peers with ``tls = true``."""

    enabled: bool = Field(False, description="Listen with TLS instead of plain TCP.")
    cert: Path | None = Field(None, description="PEM certificate (chain) of this node; relative to the config file.")
    key: Path | None = Field(None, description="PEM private key of ``cert``; relative to the config file.")
    ca: Path | None = Field(
        None, description="PEM CA bundle: checks client certificates (listener) and peer certificates (SCU).",
    )
    require_client_cert: bool = Field(
        False, description="Mutual TLS: refuse clients without a certificate signed by ``ca``.",
    )
    min_version: Literal["TLSv1.2", "TLSv1.3"] = Field("TLSv1.2", description="Lowest TLS version accepted.")

    @model_validator(mode="after")
    def _complete(self) -> TlsSection:
        if self.enabled and (self.cert is None or self.key is None):
            raise ValueError("tls.enabled needs tls.cert and tls.key (PEM files)")
        if self.require_client_cert and self.ca is None:
            raise ValueError("tls.require_client_cert needs tls.ca (the CA that signs client certificates)")
        return self


class StoreSection(_Section):
    """Where the node keeps its durable state (instances, series, results, outbox)."""

    backend: Literal["sqlite", "postgresql"] = Field(
        "sqlite", description='"sqlite": one file in node.data_dir, for one node. "postgresql": a database '
        "several nodes share (set dsn, node_id and shared_dir).",
    )
    dsn: str = Field(
        "", description='PostgreSQL connection string (libpq, e.g. "host=db dbname=medclf user=medclf") or URI; '
        "only for backend = \"postgresql\". Leave the password out and use PGPASSWORD or ~/.pgpass.",
    )
    node_id: str = Field(
        "", description="This node's name in the shared store (its claims and leases carry it); unique per node. "
        "Empty: the host name.",
    )
    shared_dir: Path | None = Field(
        None, description="Directory for received instances and result objects that every node on the same "
        "store can read and write (a shared volume); relative to the config file. Unset: node.data_dir.",
    )
    lease_seconds: float = Field(
        60.0, ge=5, description="A claimed series is this node's for this long, renewed while it is processed; "
        "when a node dies, another takes its series over after the lease runs out.",
    )

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
            raise ValueError("a node id is 1-64 of A-Z a-z 0-9 _ . -")
        return v

    @model_validator(mode="after")
    def _dsn(self) -> StoreSection:
        if self.backend == "postgresql":
            if not self.dsn.strip():
                raise ValueError('store.dsn is required when store.backend = "postgresql"')
            _check_dsn(self.dsn)
        elif self.dsn:
            raise ValueError('store.dsn is only used with store.backend = "postgresql"; remove it or set the backend')
        return self


def _check_dsn(dsn: str) -> None:
    """The DSN parses (libpq syntax), so a typo fails at start-up naming the key, not at first use."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ValueError('store.backend = "postgresql" needs psycopg: pip install "medclf-node[postgresql]"') from None
    try:
        conninfo_to_dict(dsn)
    except Exception as exc:  # psycopg.ProgrammingError: the message says what is wrong
        raise ValueError(f"store.dsn is not a valid PostgreSQL connection string: {str(exc).strip()}") from None


class Config(_Section):
    """The whole node configuration."""

    node: NodeSection = Field(default_factory=NodeSection)
    peers: list[PeerSection] = Field(default_factory=list)
    folders: list[FolderSection] = Field(default_factory=list)
    accept: AcceptSection = Field(default_factory=AcceptSection)
    completion: CompletionSection = Field(default_factory=CompletionSection)
    results: ResultsSection = Field(default_factory=ResultsSection)
    dispatch: DispatchSection = Field(default_factory=DispatchSection)
    volume: VolumeSection = Field(default_factory=VolumeSection)
    rules: list[RuleSection] = Field(default_factory=list)
    models: ModelsSection = Field(default_factory=ModelsSection)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    audit: AuditSection = Field(default_factory=AuditSection)
    retention: RetentionSection = Field(default_factory=RetentionSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    tls: TlsSection = Field(default_factory=TlsSection)
    store: StoreSection = Field(default_factory=StoreSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        names = [p.name for p in self.peers]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"peers: peer names must be unique, repeated: {sorted(dupes)}")
        folder_names = [f.name for f in self.folders]
        clash = sorted({n for n in folder_names if folder_names.count(n) > 1 or n in names})
        if clash:
            raise ValueError(f"folders: names must be unique and differ from every peer name, repeated: {clash}")
        for i, dest in enumerate(self.results.destinations):
            if dest != "sender" and dest not in names and dest not in folder_names:
                raise ValueError(
                    f"results.destinations[{i}]: {dest!r} is neither a peer nor a folder; add a [[peers]] or "
                    f'[[folders]] entry named {dest!r} or use "sender" (known peers: {names}, folders: {folder_names})'
                )
        rule_names = [r.name for r in self.rules]
        if len(set(rule_names)) != len(rule_names):
            raise ValueError("rules: rule names must be unique")
        return self

    # --- derived views -------------------------------------------------------------------
    def peer(self, name: str) -> PeerSection:
        for p in self.peers:
            if p.name == name:
                return p
        raise KeyError(name)

    def folder(self, name: str) -> FolderSection | None:
        return next((f for f in self.folders if f.name == name), None)

    def peer_by_ae_title(self, ae_title: str) -> PeerSection | None:
        for p in self.peers:
            if p.ae_title == ae_title.strip():
                return p
        return None

    def files_dir(self) -> Path:
        """Where instances and result objects live: ``store.shared_dir``, else ``node.data_dir``."""
        return self.store.shared_dir if self.store.shared_dir is not None else self.node.data_dir

    def node_id(self) -> str:
        """``store.node_id``, else the host name (made a valid id)."""
        if self.store.node_id:
            return self.store.node_id
        import socket

        return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "node"

    def audit_path(self) -> Path:
        """The audit log file: ``audit.path`` resolved against ``node.data_dir``."""
        return self.audit.path if self.audit.path.is_absolute() else self.node.data_dir / self.audit.path

    def allowed_calling_ae_titles(self) -> set[str] | None:
        """The allowed calling AE titles, or None when any is accepted."""
        if self.accept.calling_ae_titles == ["*"]:
            return None
        if self.accept.calling_ae_titles:
            return set(self.accept.calling_ae_titles)
        return {p.ae_title for p in self.peers}

    def effective_rules(self) -> list[RuleSection]:
        """The configured rules, or the built-in one: CT axial originals -> the default model."""
        if self.rules:
            return list(self.rules)
        return [
            RuleSection(
                name="default-ct",
                models=[self.models.default_model],
                modality=["CT"],
                image_type_excludes=["LOCALIZER"],
                min_slices=1,
            )
        ]


def _format_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against the configuration reference in README.md"
        elif err["type"] == "missing":
            msg = "required key is missing; add it"
        lines.append(f"  - {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, object], *, base_dir: Path | None = None, source: str = "config") -> Config:
    """Validate a config mapping; relative paths are resolved against ``base_dir``."""
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
    if base_dir is not None:
        node = cfg.node
        models = cfg.models
        if not node.data_dir.is_absolute():
            node = node.model_copy(update={"data_dir": (base_dir / node.data_dir).resolve()})
        if not models.directory.is_absolute():
            models = models.model_copy(update={"directory": (base_dir / models.directory).resolve()})
        folders = [f if f.path.is_absolute() else f.model_copy(update={"path": (base_dir / f.path).resolve()})
                   for f in cfg.folders]
        store = cfg.store
        if store.shared_dir is not None and not store.shared_dir.is_absolute():
            store = store.model_copy(update={"shared_dir": (base_dir / store.shared_dir).resolve()})
        cfg = cfg.model_copy(update={"node": node, "models": models, "folders": folders, "store": store})
        tls_paths = {
            k: (base_dir / v).resolve()
            for k, v in (("cert", cfg.tls.cert), ("key", cfg.tls.key), ("ca", cfg.tls.ca))
            if v is not None and not v.is_absolute()
        }
        if tls_paths:
            cfg = cfg.model_copy(update={"tls": cfg.tls.model_copy(update=tls_paths)})
    return cfg


def load_config(path: Path | str | None) -> Config:
    """Read and validate a TOML config file; ``None`` gives the built-in defaults."""
    if path is None:
        return parse_config({}, base_dir=Path.cwd(), source="defaults")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the configuration file: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(data, base_dir=p.resolve().parent, source=str(p))
