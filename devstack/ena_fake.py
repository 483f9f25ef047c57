"""A local stand-in for the ENA Portal API and ENA's FASTQ file server, for tests and the demo.

There is no internet here, so this serves recorded answers (devstack/ena_recordings/) in the
Portal API's real format, and the FASTQ files those answers point to, from one local server:

    GET <root>/ena/portal/api/search?result=read_run&query=study_accession="PRJEB40001"&fields=...&format=json
    GET <root>/ftp.sra.ebi.ac.uk/vol1/fastq/ERR480/001/ERR4800011/ERR4800011_1.fastq.gz

`FakeEnaServer.start()` returns the API base URL (set it as EMG_ENA_PORTAL_API) and
`fastq_url_prefix` is what EMG_ENA_FASTQ_URL_PREFIX becomes, so a `fastq_ftp` entry is
fetched as `<prefix><entry>`, exactly as `https://<entry>` is in production.

What the real API does, and so this does too:
- 200 with a JSON list of objects, one per record, every value a string; the record's own
  accession (`run_accession`, `study_accession`) comes first whatever `fields` asks for.
- No match (an unknown study, a study without runs) is not an error: 200 with `[]`
  (with `format=tsv`, the header line alone).
- A field that does not exist is 400 ("Invalid fieldName(s) supplied: ..."); so is a query
  it cannot parse. Error bodies are JSON objects with a `message`.
- `fastq_ftp`, `fastq_md5` and `fastq_bytes` are `;`-separated lists without a URL scheme.

Recorded faults, to exercise the client (each overridable, see `FakeEnaServer`):
- PRJEB40500 answers 500 to its first 2 search requests, then its data;
- PRJEB40404 answers 404 to every request (the real API answers an unknown study with `[]`);
- PRJEB40408 answers after 15 s.
An outage can also be started at any moment: `fail_next(accession, [(503, 3), (429, 2)])` makes
the accession's next 3 searches answer 503 and the 2 after those 429 (with `Retry-After: 1`).

The reads are simulated, deterministically, from a few small random genomes (devstack/ena_recordings/reads.json)
on first request and kept in memory; so `fastq_md5`/`fastq_bytes` are computed from the
served files rather than recorded (gzip bytes depend on the zlib build).

    python -m devstack.ena_fake --port 8765      # runs in the foreground, for the demo
"""

import argparse
import gzip
import hashlib
import json
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

RECORDINGS_DIR = Path(__file__).resolve().parent / "ena_recordings"
API_PATH = "/ena/portal/api"
DEFAULT_DELAYS = {"PRJEB40408": 15.0}
# accession -> (HTTP status, how many of its first requests get it; None for all of them)
DEFAULT_FAILURES = {"PRJEB40500": (500, 2), "PRJEB40404": (404, None)}
PRIMARY_ACCESSION = {"read_run": "run_accession", "study": "study_accession"}
# Real Portal API fields that the recordings do not carry: asking for one is fine and answers "".
UNRECORDED_FIELDS = {
    "read_run": {
        "fastq_md5",
        "fastq_bytes",
        "fastq_aspera",
        "submitted_ftp",
        "submitted_md5",
        "submitted_bytes",
        "submitted_format",
        "sra_ftp",
        "sra_md5",
        "sra_bytes",
        "experiment_title",
        "run_alias",
        "sample_alias",
        "nominal_length",
        "center_name",
        "study_title",
        "host_tax_id",
        "host_scientific_name",
        "collection_date",
        "country",
        "location",
        "lat",
        "lon",
        "description",
    },
    "study": {"study_name", "study_alias", "status", "parent_study_accession", "keywords", "description"},
}
# Returnable but not searchable in the real API (a query on one is a 400).
UNSEARCHABLE_FIELDS = {"fastq_ftp", "fastq_md5", "fastq_bytes"}
COMPLEMENT = str.maketrans("ACGT", "TGCA")
STOP_CODONS = ("TAA", "TAG", "TGA")


class BadRequest(Exception):
    """A request the real API answers with 400 and this message."""


# --- recordings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recordings:
    rows: dict[str, list[dict[str, str]]]  # result -> every recorded row of that result
    fastq_paths: dict[str, tuple[str, int]]  # "/ftp.sra.ebi.ac.uk/..." -> (run accession, mate)
    read_specs: dict
    genome_specs: dict

    @classmethod
    def load(cls, directory: Path = RECORDINGS_DIR) -> "Recordings":
        rows: dict[str, list[dict[str, str]]] = {result: [] for result in PRIMARY_ACCESSION}
        for path in sorted(directory.glob("PRJ*.json")):
            for result, records in json.loads(path.read_text()).items():
                rows[result].extend(records)
        simulation = json.loads((directory / "reads.json").read_text())
        fastq_paths = {}
        for run in rows["read_run"]:
            if run["run_accession"] not in simulation["runs"]:
                raise ValueError(f"{directory}/reads.json has no reads for recorded run {run['run_accession']}")
            for mate, entry in enumerate(run["fastq_ftp"].split(";"), start=1):
                fastq_paths["/" + entry] = (run["run_accession"], mate)
        return cls(rows, fastq_paths, simulation["runs"], simulation["genomes"])

    def fields(self, result: str) -> set[str]:
        """Every field the real API knows for `result`, as far as this fake is concerned."""
        return {field for row in self.rows[result] for field in row} | UNRECORDED_FIELDS[result]


# --- read simulation ------------------------------------------------------------------------------


def reverse_complement(sequence: str) -> str:
    return sequence.translate(COMPLEMENT)[::-1]


def simulate_genome(length: int, seed: int) -> str:
    """A random genome that looks like a bacterial one to a gene finder: dense genes on both strands."""
    rng = random.Random(seed)
    sense_codons = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT" if a + b + c not in STOP_CODONS]
    parts, size = [], 0
    while size < length:
        spacer = "".join(rng.choice("ACGT") for _ in range(rng.randint(30, 200)))
        gene = "ATG" + "".join(rng.choice(sense_codons) for _ in range(rng.randint(120, 400))) + rng.choice(STOP_CODONS)
        parts += [spacer, gene if rng.random() < 0.5 else reverse_complement(gene)]
        size += len(spacer) + len(gene)
    return "".join(parts)[:length]


def simulate_reads(spec: dict, genomes: Mapping[str, str], run: str) -> tuple[bytes, bytes]:
    """Both mates of a paired-end run as FASTQ text, reproducible from the spec's seed."""
    rng = random.Random(spec["seed"])
    names, weights = zip(*spec["abundance"].items())
    read_length, fragment_length = spec["read_length"], spec["fragment_length"]
    mates: tuple[list[str], list[str]] = ([], [])
    for number in range(1, spec["read_pairs"] + 1):
        genome = genomes[rng.choices(names, weights)[0]]
        start = rng.randrange(len(genome) - fragment_length)
        fragment = genome[start : start + fragment_length]
        if rng.random() < 0.5:
            fragment = reverse_complement(fragment)
        for mate, sequence in enumerate((fragment[:read_length], reverse_complement(fragment)[:read_length])):
            sequence, quality = add_errors(sequence, spec["error_rate"], rng)
            mates[mate].append(f"@{run}.{number} {number}/{mate + 1}\n{sequence}\n+\n{quality}\n")
    second = "".join(mates[1])
    if spec.get("truncate_mate_2"):
        # As an interrupted upload leaves it: the last record cut off mid-sequence.
        second = second[: second.rindex("@") + 20]
    return "".join(mates[0]).encode(), second.encode()


def add_errors(sequence: str, rate: float, rng: random.Random) -> tuple[str, str]:
    """Substitution errors at `rate`, each with a low quality score, as a sequencer reports them."""
    bases, quality = list(sequence), ["F"] * len(sequence)
    for position in range(len(bases)):
        if rng.random() < rate:
            bases[position] = rng.choice([base for base in "ACGT" if base != bases[position]])
            quality[position] = "+"
    return "".join(bases), "".join(quality)


class FastqStore:
    """Gzipped FASTQ per (run, mate), simulated on first request and then kept in memory."""

    def __init__(self, recordings: Recordings):
        self.recordings = recordings
        self._lock = threading.Lock()
        self._genomes: dict[str, str] = {}
        self._files: dict[tuple[str, int], bytes] = {}

    def get(self, run: str, mate: int) -> bytes:
        with self._lock:
            if (run, mate) not in self._files:
                self._simulate(run)
            return self._files[(run, mate)]

    def _simulate(self, run: str) -> None:
        spec = self.recordings.read_specs[run]
        for name in spec["abundance"]:
            if name not in self._genomes:
                self._genomes[name] = simulate_genome(**self.recordings.genome_specs[name])
        for mate, text in enumerate(simulate_reads(spec, self._genomes, run), start=1):
            # mtime=0 keeps the bytes, and so fastq_md5, the same from one server start to the next.
            self._files[(run, mate)] = gzip.compress(text, mtime=0)

    def file_fields(self, run: dict[str, str]) -> dict[str, str]:
        """fastq_md5 and fastq_bytes of a recorded run, in the API's `;`-separated form."""
        files = [self.get(run["run_accession"], mate) for mate in range(1, run["fastq_ftp"].count(";") + 2)]
        return {
            "fastq_md5": ";".join(hashlib.md5(data).hexdigest() for data in files),
            "fastq_bytes": ";".join(str(len(data)) for data in files),
        }


# --- the query language ---------------------------------------------------------------------------

TOKEN = re.compile(r'\s*(?:(\()|(\))|(AND|OR|NOT)\b|([a-z_]+)\s*=\s*(?:"([^"]*)"|([^\s()"]+)))')
Predicate = Callable[[dict[str, str]], bool]


def parse_query(query: str, searchable: set[str]) -> tuple[Predicate, set[str]]:
    """A predicate for the Portal API's `field=value` / AND / OR / NOT / parentheses queries,
    and the accessions the query names (what the server counts requests by)."""
    text = query.strip()
    if len(text) > 1 and text[0] == text[-1] == '"':
        text = text[1:-1]  # clients may quote the whole query; the API accepts that
    tokens, position = [], 0
    while position < len(text.rstrip()):
        match = TOKEN.match(text, position)
        if not match:
            raise BadRequest(f"Invalid query: cannot parse {text[position : position + 30]!r}")
        tokens.append(match.groups())
        position = match.end()
    parser = _QueryParser(tokens, searchable)
    predicate = parser.expression()
    if parser.position != len(tokens):
        raise BadRequest(f"Invalid query: unexpected {parser.describe()} in {query!r}")
    return predicate, parser.accessions


class _QueryParser:
    """Recursive descent: expression := term (OR term)*; term := factor (AND factor)*;
    factor := NOT factor | ( expression ) | field=value."""

    def __init__(self, tokens: list[tuple], searchable: set[str]):
        self.tokens = tokens
        self.searchable = searchable
        self.position = 0
        self.accessions: set[str] = set()

    def describe(self) -> str:
        if self.position >= len(self.tokens):
            return "end of query"
        return repr(next(part for part in self.tokens[self.position] if part))

    def _peek(self, index: int) -> str | None:
        return self.tokens[self.position][index] if self.position < len(self.tokens) else None

    def expression(self) -> Predicate:
        terms = [self.term()]
        while self._peek(2) == "OR":
            self.position += 1
            terms.append(self.term())
        return lambda row: any(term(row) for term in terms)

    def term(self) -> Predicate:
        factors = [self.factor()]
        while self._peek(2) == "AND":
            self.position += 1
            factors.append(self.factor())
        return lambda row: all(factor(row) for factor in factors)

    def factor(self) -> Predicate:
        if self._peek(2) == "NOT":
            self.position += 1
            inner = self.factor()
            return lambda row: not inner(row)
        if self._peek(0):
            self.position += 1
            inner = self.expression()
            if not self._peek(1):
                raise BadRequest(f"Invalid query: expected ')' but found {self.describe()}")
            self.position += 1
            return inner
        field = self._peek(3)
        if not field:
            raise BadRequest(f"Invalid query: expected field=value but found {self.describe()}")
        _, _, _, _, quoted, bare = self.tokens[self.position]
        self.position += 1
        if field not in self.searchable:
            raise BadRequest(f"Invalid column ({field}) has been provided in query")
        value = quoted if quoted is not None else bare
        if field.endswith("_accession"):
            self.accessions.add(value)
        return lambda row: row.get(field, "").lower() == value.lower()


# --- answering a search ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Search:
    result: str
    predicate: Predicate
    accessions: frozenset[str]
    fields: tuple[str, ...]
    response_format: str
    limit: int


def parse_search(params: dict[str, list[str]], recordings: Recordings) -> Search:
    first = {name: values[0] for name, values in params.items()}
    result = first.get("result", "")
    if result not in PRIMARY_ACCESSION:
        raise BadRequest(f"Invalid result: {result!r}" if result else "Required parameter 'result' is missing")
    known = recordings.fields(result)
    predicate, accessions = (
        parse_query(first["query"], known - UNSEARCHABLE_FIELDS) if first.get("query") else (lambda row: True, set())
    )
    fields = _requested_fields(result, first.get("fields", ""), known)
    response_format = first.get("format", "tsv").lower()
    if response_format not in ("json", "tsv"):
        raise BadRequest(f"Invalid format: {response_format}")
    try:
        limit = int(first.get("limit", "0"))
    except ValueError:
        raise BadRequest(f"Invalid limit: {first['limit']}") from None
    return Search(result, predicate, frozenset(accessions), fields, response_format, limit)


def _requested_fields(result: str, fields_param: str, known: set[str]) -> tuple[str, ...]:
    requested = [field.strip() for field in fields_param.split(",") if field.strip()]
    unknown = [field for field in requested if field not in known]
    if unknown:
        raise BadRequest(f"Invalid fieldName(s) supplied: {','.join(unknown)}")
    primary = PRIMARY_ACCESSION[result]
    return (primary, *[field for field in requested if field != primary])


def answer(search: Search, recordings: Recordings, fastq: FastqStore) -> tuple[str, str]:
    """(content type, body) of a successful search, in the requested format."""
    matches = [row for row in recordings.rows[search.result] if search.predicate(row)]
    if search.limit > 0:
        matches = matches[: search.limit]
    records = [_project(row, search, fastq) for row in matches]
    if search.response_format == "json":
        return "application/json", json.dumps(records)
    lines = ["\t".join(search.fields)] + ["\t".join(record.values()) for record in records]
    return "text/plain", "\n".join(lines) + "\n"


def _project(row: dict[str, str], search: Search, fastq: FastqStore) -> dict[str, str]:
    values = dict(row)
    if search.result == "read_run" and {"fastq_md5", "fastq_bytes"} & set(search.fields):
        values.update(fastq.file_fields(row))
    return {field: values.get(field, "") for field in search.fields}


# --- the server -----------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == f"{API_PATH}/search":
            self._search(parse_qs(url.query, keep_blank_values=True))
        elif url.path in self.server.fake.recordings.fastq_paths:
            run, mate = self.server.fake.recordings.fastq_paths[url.path]
            self._send(HTTPStatus.OK, "application/octet-stream", self.server.fake.fastq.get(run, mate))
        else:
            self._send_error(HTTPStatus.NOT_FOUND, f"No resource at {url.path}")

    def _search(self, params: dict[str, list[str]]) -> None:
        fake = self.server.fake
        try:
            search = parse_search(params, fake.recordings)
        except BadRequest as error:
            self._send_error(HTTPStatus.BAD_REQUEST, str(error))
            return
        fault, delay = fake.record_request(search)
        if delay and fake.stopping.wait(delay):
            return  # the server is stopping: give up on the answer
        if fault:
            self._send_error(
                HTTPStatus(fault),
                f"Recorded fault for {', '.join(sorted(search.accessions))}",
                headers={"Retry-After": "1"} if fault == HTTPStatus.TOO_MANY_REQUESTS else None,
            )
            return
        content_type, body = answer(search, fake.recordings, fake.fastq)
        self._send(HTTPStatus.OK, content_type, body.encode())

    def _send_error(self, status: HTTPStatus, message: str, headers: Mapping[str, str] | None = None) -> None:
        # Shaped like the Spring Boot error body the Portal API's errors come in; clients should rely on `message`.
        body = {
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "status": status.value,
            "error": status.phrase,
            "message": message,
            "path": urlsplit(self.path).path,
        }
        self._send(status, "application/json", json.dumps(body).encode(), headers)

    def _send(
        self, status: HTTPStatus, content_type: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        if self.server.fake.verbose:
            super().log_message(format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: "FakeEnaServer"


class FakeEnaServer:
    """The fake ENA, serving from a background thread.

    `delays` ({accession: seconds}) and `failures` ({accession: (HTTP status, first N requests
    or None for all)}) are merged over the recorded defaults, so `delays={"PRJEB40408": 0}`
    switches a default off. Requests are counted by the accessions their query names and by
    result; a fault applies to an accession's first N requests since the last `reset_counts()`.
    """

    def __init__(
        self,
        delays: Mapping[str, float] | None = None,
        failures: Mapping[str, tuple[int, int | None]] | None = None,
        recordings_dir: Path = RECORDINGS_DIR,
        verbose: bool = False,
    ):
        self.delays = {**DEFAULT_DELAYS, **(delays or {})}
        self.failures = {**DEFAULT_FAILURES, **(failures or {})}
        self.recordings = Recordings.load(recordings_dir)
        self.fastq = FastqStore(self.recordings)
        self.verbose = verbose
        self.stopping = threading.Event()
        self._requests: list[tuple[str, frozenset[str]]] = []
        self._queued_faults: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, port: int = 0, host: str = "127.0.0.1") -> str:
        """Serve on `port` (0: any free port) and return the API base URL."""
        self._server = _Server((host, port), _Handler)
        self._server.fake = self
        self.stopping.clear()
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-ena", daemon=True)
        self._thread.start()
        return self.base_url

    @property
    def root_url(self) -> str:
        assert self._server is not None, "the fake ENA is not serving"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def base_url(self) -> str:
        return self.root_url + API_PATH

    @property
    def fastq_url_prefix(self) -> str:
        """EMG_ENA_FASTQ_URL_PREFIX for this server: `<prefix><fastq_ftp entry>` is a read file's URL."""
        return self.root_url + "/"

    def stop(self) -> None:
        self.stopping.set()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._server = None

    def fail_next(self, accession: str, faults: list[tuple[int, int]]) -> None:
        """From now on, answer the accession's next searches with these (HTTP status, times), in order."""
        with self._lock:
            self._queued_faults[accession] = [status for status, times in faults for _ in range(times)]

    def record_request(self, search: Search) -> tuple[int | None, float]:
        """Count a search; return the (fault status or None, delay in seconds) it gets."""
        with self._lock:
            earlier = {accession: self._count(accession, None) for accession in search.accessions}
            self._requests.append((search.result, search.accessions))
            queued = [
                self._queued_faults[accession].pop(0)
                for accession in sorted(search.accessions)
                if self._queued_faults.get(accession)
            ]
        if queued:
            return queued[0], 0.0
        fault = None
        for accession in sorted(search.accessions):
            status, times = self.failures.get(accession, (None, 0))
            if status and (times is None or earlier[accession] < times):
                fault = status
        delay = max((self.delays.get(accession, 0.0) for accession in search.accessions), default=0.0)
        return fault, delay

    def request_count(self, accession: str | None = None, result: str | None = None) -> int:
        """Search requests so far (since `reset_counts()`) naming `accession` and for `result`; None matches any."""
        with self._lock:
            return self._count(accession, result)

    def _count(self, accession: str | None, result: str | None) -> int:
        return sum(
            1
            for seen_result, accessions in self._requests
            if (accession is None or accession in accessions) and (result is None or result == seen_result)
        )

    def reset_counts(self) -> None:
        with self._lock:
            self._requests.clear()
            self._queued_faults.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the recorded ENA Portal API and its FASTQ files locally.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    server = FakeEnaServer(verbose=True)
    base_url = server.start(port=args.port, host=args.host)
    print(f"EMG_ENA_PORTAL_API={base_url}\nEMG_ENA_FASTQ_URL_PREFIX={server.fastq_url_prefix}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
