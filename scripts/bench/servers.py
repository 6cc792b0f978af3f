"""The processes a run measures or measures against: the proxy, the minimal
aiohttp references, the direct boto3 upload, moto, and the Node peer
(@tus/server + @tus/s3-store) with its tus-js-client driver."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .common import BUCKET, HOST, Child, child_env, free_port, spawn, stop_child, wait_http

__all__ = ["child_env", "spawn", "stop_child"]

# The floor: what aiohttp costs to read a body and throw it away.
FLOOR_SERVER = r"""
import sys
from aiohttp import web

host, port = sys.argv[1], int(sys.argv[2])

async def put(request):
    received = 0
    while True:
        data = await request.content.readany()
        if not data:
            break
        received += len(data)
    return web.json_response({"size": received})

app = web.Application()
app.router.add_put("/upload/{name}", put)
web.run_app(app, host=host, port=port, print=None, access_log=None)
"""

# The filesystem reference: what a minimal resumable-upload server costs. It
# reads the body exactly like the proxy (``readany()``), writes synchronously
# and fsyncs before every answer, because acknowledged bytes must be durable
# for resumption to mean anything; it computes no digest and keeps no state.
REFERENCE_SERVER = r"""
import os, re, sys
from aiohttp import web

host, port, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+)")

async def put(request):
    path = os.path.join(root, request.match_info["name"])
    match = RANGE.fullmatch(request.headers.get("Content-Range", ""))
    start, total = (int(match[1]), int(match[3])) if match else (0, None)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (0 if start else os.O_TRUNC), 0o644)
    received = 0
    try:
        os.lseek(fd, start, os.SEEK_SET)
        while True:
            data = await request.content.readany()
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            received += len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    end = start + received
    if total is not None and end < total:
        return web.Response(status=308, headers={"Range": f"bytes=0-{end - 1}"})
    return web.json_response({"size": end})

app = web.Application()
app.router.add_put("/upload/{name}", put)
web.run_app(app, host=host, port=port, print=None, access_log=None)
"""

# The S3 reference: the same bytes sent straight to moto by boto3, configured
# like the proxy's client (no payload signing, CRC32C part checksums computed
# with google_crc32c) so the comparison is the proxy's overhead, not a
# different client setup. Parts go one at a time: the simplest direct client.
# It waits on stdin around the upload so the parent can take CPU and RSS
# readings of exactly the upload, without boto3's import and set-up.
DIRECT_S3_UPLOAD = r"""
import base64, json, random, sys, time
import boto3, google_crc32c
from botocore.config import Config

endpoint, bucket, key = sys.argv[1], sys.argv[2], sys.argv[3]
size, part_size, seed, block = (int(v) for v in sys.argv[4:8])
client = boto3.client(
    "s3", endpoint_url=endpoint, region_name="us-east-1",
    aws_access_key_id="testing", aws_secret_access_key="testing",
    config=Config(s3={"addressing_style": "path", "payload_signing_enabled": False},
                  request_checksum_calculation="when_supported",
                  response_checksum_validation="when_supported"),
)
client.create_bucket(Bucket=bucket)
base_tail = random.Random(seed).randbytes(block)[8:]

def piece(start, end):
    out = []
    pos = start
    while pos < end:
        index, skip = divmod(pos, block)
        data = index.to_bytes(8, "big") + base_tail
        take = min(block - skip, end - pos)
        out.append(data[skip:skip + take])
        pos += take
    return b"".join(out)

def b64(crc):
    return base64.b64encode(crc.to_bytes(4, "big")).decode()

print("READY", flush=True)
sys.stdin.readline()
started = time.perf_counter()
upload_id = client.create_multipart_upload(
    Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32C")["UploadId"]
parts, crc = [], 0
for number, start in enumerate(range(0, size, part_size), 1):
    data = piece(start, min(start + part_size, size))
    part_crc = google_crc32c.value(data)
    crc = google_crc32c.extend(crc, data)
    etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                              Body=data, ChecksumCRC32C=b64(part_crc))["ETag"]
    parts.append({"PartNumber": number, "ETag": etag, "ChecksumCRC32C": b64(part_crc)})
client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                 MultipartUpload={"Parts": parts})
wall = time.perf_counter() - started
print(json.dumps({"wall_s": wall, "crc32c": crc, "parts": len(parts)}), flush=True)
sys.stdin.readline()
"""


# The peer: @tus/server with @tus/s3-store into the same moto, parts of PART bytes.
PEER_SERVER = r"""
const http = require('http');
const { Server } = require('@tus/server');
const { S3Store } = require('@tus/s3-store');
const [port, endpoint, bucket, partSize] = process.argv.slice(1);
const store = new S3Store({
  partSize: Number(partSize),
  s3ClientConfig: {
    bucket, endpoint, region: 'us-east-1', forcePathStyle: true,
    credentials: { accessKeyId: 'testing', secretAccessKey: 'testing' },
  },
});
const server = new Server({ path: '/files', datastore: store });
http.createServer((req, res) => server.handle(req, res)).listen(Number(port), '127.0.0.1');
"""

# The tus client: tus-js-client under node, the same for the peer and the proxy.
# It reads the payload file first, then waits on stdin, so the parent measures
# the upload only.
TUS_CLIENT = r"""
const fs = require('fs');
const readline = require('readline');
const tus = require('tus-js-client');
const [endpoint, file, chunkSize, name] = process.argv.slice(1);
const data = fs.readFileSync(file);
const rl = readline.createInterface({ input: process.stdin });
// A small upload first, so start-up costs (JIT, first connections, the
// store's set-up) stay out of the figures, as for every other row.
const warm = new tus.Upload(Buffer.alloc(64 * 1024, 7), {
  endpoint, chunkSize: Number(chunkSize), retryDelays: [], uploadSize: 64 * 1024,
  metadata: { filename: 'warmup-' + name, filetype: 'application/octet-stream' },
  onError(err) { console.log(JSON.stringify({ error: 'warm-up: ' + String(err) })); },
  onSuccess() { console.log('READY'); },
});
warm.start();
rl.once('line', () => {
  const started = process.hrtime.bigint();
  let requests = 0;
  const upload = new tus.Upload(data, {
    endpoint, chunkSize: Number(chunkSize), retryDelays: [],
    uploadSize: data.length, metadata: { filename: name, filetype: 'application/octet-stream' },
    onBeforeRequest() { requests += 1; },
    onError(err) { console.log(JSON.stringify({ error: String(err) })); process.exit(1); },
    onSuccess() {
      const wall = Number(process.hrtime.bigint() - started) / 1e9;
      console.log(JSON.stringify({ wall_s: wall, url: upload.url, requests }));
      rl.once('line', () => process.exit(0));
    },
  });
  upload.start();
});
"""

PEER_PACKAGES = ("@tus/server@1", "@tus/s3-store@1", "tus-js-client@4")


def node_dir(tmp_root: Path | None = None) -> tuple[Path | None, str]:
    """A directory whose node_modules holds PEER_PACKAGES (installed once, then
    reused), or None and the reason to skip."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return None, "node/npm not installed"
    root = Path(os.environ.get("TMPDIR", "/tmp")) / "upload-bench-peer"
    done = root / ".installed"
    if done.exists():
        return root, ""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "package.json").exists():
        (root / "package.json").write_text(json.dumps({"name": "bench-peer", "private": True}))
    env = {**os.environ, "npm_config_fund": "false", "npm_config_audit": "false",
           "npm_config_update_notifier": "false"}
    try:
        result = subprocess.run(
            [npm, "install", "--no-save", "--no-package-lock", *PEER_PACKAGES],
            cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        return None, "npm install timed out"
    if result.returncode != 0:
        return None, f"npm install failed: {result.stderr[-300:]}"
    done.write_text("ok")
    return root, ""


async def start_moto(tmp: Path, tag: str) -> Child:
    port = free_port()
    moto = await spawn(
        "moto", [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
        child_env({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}),
        tmp / f"moto-{tag}.log",
    )
    moto.url = f"http://{HOST}:{port}"
    await wait_http(moto)
    return moto


@functools.lru_cache(maxsize=8)
def s3_client(endpoint: str) -> object:
    """One boto3 client per moto (they are thread-safe; making one costs ~0.1 s)."""
    import boto3  # only the S3 part needs it

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )


def proxy_env(store: str, tmp: Path, *, root: Path | None = None, moto: Child | None = None,
              extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        "APP__STORAGE__BACKEND": store,
        "APP__LOGGING__LEVEL": "WARNING",
        "APP__SERVER__SHUTDOWN_TIMEOUT": "5s",
    }
    if store == "filesystem":
        assert root is not None
        env["APP__STORAGE__FILESYSTEM__ROOT"] = str(root)
    else:
        assert moto is not None
        env.update({
            "APP__STORAGE__S3__BUCKET": BUCKET,
            "APP__STORAGE__S3__ENDPOINT_URL": moto.url,
            "APP__STORAGE__S3__CREATE_BUCKET": "true",
            "APP__STORAGE__S3__ADDRESSING_STYLE": "path",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true",
            # Nothing from a developer's ~/.aws may change the client.
            "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
        })
    env.update(extra or {})
    return child_env(env)


async def start_proxy(store: str, tmp: Path, tag: str, *, root: Path | None = None,
                      moto: Child | None = None,
                      extra: dict[str, str] | None = None) -> Child:
    port = free_port()
    proxy = await spawn(
        f"{store} proxy", [sys.executable, "-m", "app", "--host", HOST, "--port", str(port)],
        proxy_env(store, tmp, root=root, moto=moto, extra=extra), tmp / f"proxy-{tag}.log")
    proxy.url = f"http://{HOST}:{port}"
    await wait_http(proxy)
    return proxy


async def start_script(name: str, script: str, args: list[str], tmp: Path, tag: str) -> Child:
    port = free_port()
    child = await spawn(name, [sys.executable, "-c", script, HOST, str(port), *args],
                        child_env({}), tmp / f"{tag}.log")
    child.url = f"http://{HOST}:{port}"
    await wait_http(child)
    return child


async def start_peer(node_root: Path, moto: Child, part_size: int, tmp: Path) -> Child:
    port = free_port()
    child = await spawn("tus peer (node)",
                        ["node", "-e", PEER_SERVER, str(port), moto.url, BUCKET, str(part_size)],
                        child_env({"NODE_PATH": str(node_root / "node_modules")}),
                        tmp / "peer.log", cwd=node_root)
    child.url = f"http://{HOST}:{port}"
    await wait_http(child)
    return child


async def spawn_tus_client(node_root: Path, endpoint: str, file: Path, chunk: int, name: str,
                           tmp: Path) -> Child:
    return await spawn("tus-js-client", ["node", "-e", TUS_CLIENT, endpoint, str(file),
                                         str(chunk), name],
                       child_env({"NODE_PATH": str(node_root / "node_modules")}),
                       tmp / "tus-client.log", pipes=True, cwd=node_root)


