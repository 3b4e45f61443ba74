#!/usr/bin/env bash
# Build the vLLM 0.26.0 offline kit as TWO archives, each small enough for one device `run` call (64 MiB carry,
# ~1 MiB of it the checkout): results/VLLM-OFFLINE.md says why two, and why strip 2.
# Runs on a Linux CPU machine with PyPI: `python3 -m pip` (any python3 >= 3.8), GNU tar, xz, sha256sum.
#
#   bash scripts/vllm_kit/build.sh OUTDIR        (e.g. .vllm-kit: git-ignored, so it travels only when carried)
#
# -> OUTDIR/part1/vllm-kit-part1.tar.xz  the stripped vllm tree (vllm/ + its dist-info), untarred straight into
#                                        the venv's site-packages by install.sh: no pip pass over 4.6k files,
#                                        no 110 MiB zip to rebuild; RECORD is rewritten without the removed files
#                                        (the `vllm` console script is written by install.sh)
#    OUTDIR/part2/vllm-kit-part2.tar.xz  dependency wheels the GPU base lacks (rewritten as stored zips: xz packs
#                                        those far better than deflated ones), SHA256SUMS, kit.lock (which holds
#                                        part1's sha256, so install.sh refuses a part1 from another build)
#    OUTDIR/vllm-kit.lock, OUTDIR/install.sh
# Each part lives in its own folder so that a `run` call carries exactly one (carry: .vllm-kit/part1).
# env: VLLM_KIT_MAX_MIB   size limit per archive (default 60); the build fails above it
#      VLLM_KIT_KEEP_MOE=1  keep vllm/_moe_C_stable_libtorch (MoE ops, 45.3 MiB, 38.5 MiB xz) as a third archive,
#                         OUTDIR/part3/vllm-kit-part3.tar.xz (a third call: it fits neither part). vllm imports it
#                         inside contextlib.suppress(ImportError) and only fused-MoE layers call it, so a dense model
#                         should not need it -- read from the source, NOT verified on a GPU
#      VLLM_KIT_DL_DIR    download cache (default: scratch); reruns reuse the wheels already there
#      VLLM_KIT_PIP_ARGS  extra `pip download` args (pip runs --isolated)
#      KEEP_WORK=1        keep the scratch dir
set -eu
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$(mkdir -p "${1:?usage: bash build.sh OUTDIR}" && cd "$1" && pwd)"
PY="${PYTHON:-python3}"
MAX_MIB="${VLLM_KIT_MAX_MIB:-60}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/vllm-kit-build.XXXXXX")"
[ "${KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
command -v xz >/dev/null || { echo "[build] need xz"; exit 1; }
DL="${VLLM_KIT_DL_DIR:-$WORK/dl}"; mkdir -p "$DL"; DL="$(cd "$DL" && pwd)"

# Pins. vllm 0.26.0's Requires-Dist minus what the GPU base python (/opt/torch/.venv, KINDS.md's package list)
# already has: torch/vision/audio, transformers, tokenizers, numpy, numba+llvmlite, tiktoken, uvloop, httpx,
# anyio, prometheus-client, py-cpuinfo, einops, cloudpickle, opencv, pillow, protobuf, ... are NOT here.
# Left out (lazily imported kernel/media/CLI packages; results/VLLM-OFFLINE.md): torchcodec, PyNvVideoCodec,
# tilelang, nvidia-cutlass-dsl (87 MiB), nvidia-cudnn-frontend, quack-kernels, tokenspeed-mla, humming-kernels,
# fastsafetensors, nvtx, mcp, opentelemetry-exporter-otlp, anthropic (vllm never imports it: its /v1/messages
# protocol is its own). openai stays on 2.x: 3.x moved to httpx2 (the base has httpx). Newest release of each
# inside the ranges, 2026-11, except xgrammar 0.2.7: 0.2.8 needs apache-tvm-ffi>=0.1.11, vllm pins 0.1.10 (seen
# failing on CPU: load_lib_module() got an unexpected keyword argument 'extra_lib_paths'). Step 2 checks every
# Requires-Dist of these wheels and of vllm against the pins, the base names and the left-out list.
cat > "$WORK/pins.txt" <<'EOF'
flashinfer-python==0.6.14
apache-tvm-ffi==0.1.10
cuda-tile==1.7.0
compressed-tensors==0.17.0
loguru==0.7.3
depyf==0.20.0
astor==0.8.1
dill==0.4.1
fastapi==0.136.3
starlette==1.10.0
uvicorn==0.54.0
httptools==0.9.0
python-multipart==0.0.34
prometheus-fastapi-instrumentator==8.1.0
model-hosting-container-standards==0.1.16
jmespath==1.1.0
supervisor==4.3.0
pyzmq==27.3.0
msgspec==0.22.0
partial-json-parser==0.2.1.1.post7
blake3==1.0.11
cbor2==6.3.0
ijson==3.6.0
cachetools==8.0.2
openai==2.54.0
jiter==0.19.0
distro==1.9.0
sniffio==1.3.1
openai-harmony==0.0.8
mistral-common==1.13.1
# transformers' MistralCommonBackend (imported by vllm's structured output) -> mistral_common.protocol.transcription
# -> pydantic_extra_types.language_code -> pycountry: without it `import vllm.entrypoints.openai.api_server` fails
pydantic-extra-types==2.11.1
pycountry==26.2.16
lm-format-enforcer==0.11.3
interegular==0.3.3
llguidance==1.7.6
outlines-core==0.2.14
lark==1.2.2
xgrammar==0.2.7
gguf==0.19.0
watchfiles==1.3.0
python-json-logger==4.2.0
pybase64==1.5.1
setproctitle==1.3.8
pydantic==2.14.4
pydantic-core==2.50.5
annotated-types==0.8.0
typing-inspection==0.4.5
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
referencing==0.37.0
rpds-py==2026.9.1
opentelemetry-api==1.45.2
opentelemetry-sdk==1.45.2
opentelemetry-semantic-conventions==0.66b2
opentelemetry-semantic-conventions-ai==0.5.1
# aiohttp family: the base has it too (version unread); shipped so the venv surely has vllm's aiohttp>=3.13.3
# and the yarl>=1.25.1 that aiohttp 3.14 needs (~2 MiB). attrs and idna come from the base.
aiohttp==3.14.5
aiohappyeyeballs==2.7.1
aiosignal==1.4.0
frozenlist==1.8.0
multidict==7.2.1
propcache==0.5.4
yarl==1.25.1
EOF
grep -E '^[A-Za-z0-9]' "$WORK/pins.txt" > "$WORK/deps.txt"
echo "[build] work: $WORK  out: $OUT  downloads: $DL  ($(wc -l < "$WORK/deps.txt") dependency pins)"

# 1) download exactly the pins, no dependency resolution (the flags of results/VLLM-OFFLINE.md; wider manylinux
# list because some wheels are tagged only 2_24/2_26/2_27/2_31, as in the SGLang kit)
PLAT=()
for v in 39 38 37 36 35 34 33 32 31 30 29 28 27 26 25 24 17 12 5; do PLAT+=(--platform "manylinux_2_${v}_x86_64"); done
PLAT+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform any)
echo vllm==0.26.0 > "$WORK/vllm.txt"
for sec in vllm deps; do
  # shellcheck disable=SC2086
  PIP_CONFIG_FILE=/dev/null "$PY" -m pip download --isolated --disable-pip-version-check -q --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    "${PLAT[@]}" -d "$DL/$sec" -r "$WORK/$sec.txt" ${VLLM_KIT_PIP_ARGS:-}
done

# 2) part1: unpack + strip vllm; part2: the wheels as stored zips; check pins <-> files (one version each)
"$PY" - "$WORK" "$DL" "${VLLM_KIT_KEEP_MOE:-0}" <<'PYEOF'
import glob, os, re, shutil, sys, zipfile
work, dl, keep_moe = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
def canon(n): return re.sub(r"[-_.]+", "-", n).lower()
def pick(sec, pins):
    got = {}
    for f in sorted(glob.glob(os.path.join(dl, sec, "*.whl"))):
        n, v = os.path.basename(f).split("-")[:2]
        if pins.get(canon(n)) == v:  # a reused download dir may hold other versions: ignore them
            got.setdefault(canon(n), []).append(f)
    for n, v in pins.items():
        if len(got.get(n, [])) != 1:
            sys.exit(f"[build] pin {n}=={v}: expected one wheel, found {got.get(n)}")
    return {n: fs[0] for n, fs in got.items()}

# strip 2 of results/VLLM-OFFLINE.md; every rule must remove something (else the wheel layout changed)
RULES = {
    "FA2/FA3": lambda f: f in ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so"),
    "_moe_C": lambda f: f == "vllm/_moe_C_stable_libtorch.abi3.so",
    "_flashmla_C": lambda f: f == "vllm/_flashmla_C.abi3.so",
    "_flashmla_extension_C": lambda f: f == "vllm/_flashmla_extension_C.abi3.so",
    "_qutlass_C": lambda f: f == "vllm/_qutlass_C.abi3.so",
    "deep_gemm": lambda f: f.startswith("vllm/third_party/deep_gemm/"),
    "fmha_sm100": lambda f: f.startswith("vllm/third_party/fmha_sm100/"),
    "vllm-rs": lambda f: f == "vllm/vllm-rs",
    "swagger UI": lambda f: f.startswith("vllm/entrypoints/serve/instrumentator/static/"),
}
[whl] = pick("vllm", {"vllm": "0.26.0"}).values()
z = zipfile.ZipFile(whl)
infos = [i for i in z.infolist() if not i.is_dir()]
site, extra = os.path.join(work, "p1"), os.path.join(work, "p3", "extra")
removed, moved, hits = [], [], {k: 0 for k in RULES}
for i in infos:
    rule = next((k for k, r in RULES.items() if r(i.filename)), None)
    if rule:
        hits[rule] += 1
        if rule == "_moe_C" and keep_moe:
            moved.append(i); continue
        removed.append(i); continue
    z.extract(i, site)
    os.chmod(os.path.join(site, i.filename), (i.external_attr >> 16) & 0o777 or 0o644)
for i in moved:  # shipped as part3, copied into site-packages/vllm/ by install.sh
    z.extract(i, extra)
    os.chmod(os.path.join(extra, i.filename), 0o755)
missing = [k for k, n in hits.items() if not n]
if missing:
    sys.exit(f"[build] strip rules matched nothing: {missing} -- wheel layout changed, check the rules")
gone = {i.filename for i in removed}
rec = os.path.join(site, "vllm-0.26.0.dist-info", "RECORD")
lines = [l for l in open(rec) if l.split(",", 1)[0] not in gone]
open(rec, "w").writelines(lines)
mib = lambda b: b / 2**20
print(f"[build] vllm: {len(infos)} files {mib(sum(i.file_size for i in infos)):.1f} MiB -> part1 "
      f"{len(infos) - len(removed) - len(moved)} files "
      f"{mib(sum(i.file_size for i in infos) - sum(i.file_size for i in removed + moved)):.1f} MiB; removed "
      f"{len(removed)} files ({mib(sum(i.file_size for i in removed)):.1f} MiB)"
      + (f"; _moe_C moved to part3 ({mib(sum(i.file_size for i in moved)):.1f} MiB)" if moved else ""))

pins = {}
for line in open(os.path.join(work, "deps.txt")):
    n, v = line.strip().split("==")
    if canon(n) in pins:
        sys.exit(f"[build] {n} pinned twice")
    pins[canon(n)] = v
os.makedirs(os.path.join(work, "p2", "wheels"))
lock = []
tin = tout = 0
for n, f in sorted(pick("deps", pins).items()):
    out = os.path.join(work, "p2", "wheels", os.path.basename(f))
    zin = zipfile.ZipFile(f)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zo:  # same files, same RECORD: only recompressed
        for i in zin.infolist():
            zi = zipfile.ZipInfo(i.filename, date_time=i.date_time)
            zi.external_attr = i.external_attr
            zo.writestr(zi, zin.read(i), compress_type=zipfile.ZIP_STORED)
    tin += os.path.getsize(f); tout += os.path.getsize(out)
    lock.append(f"{n}=={pins[n]}  {os.path.basename(f)}")
open(os.path.join(work, "deps.lock"), "w").write("\n".join(lock) + "\n")

# Requires-Dist of every shipped wheel and of vllm (no extras; markers for CPython 3.12 on Linux x86_64): a name
# must be shipped (and its pin must satisfy the range), in the GPU base, or knowingly left out -- else fail, so
# a changed pin cannot silently leave a hole that only shows on the GPU machine.
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.version import Version
BASE = set("""annotated-doc anyio attrs click cloudpickle einops filelock h11 httpx idna ninja numba numpy nvidia-ml-py
  opencv-python-headless packaging pillow prometheus-client protobuf psutil py-cpuinfo pyyaml regex requests
  safetensors sentencepiece setuptools six tabulate tiktoken tokenizers torch torchaudio torchvision tqdm
  transformers triton typing-extensions""".split())  # names in KINDS.md's package list of the GPU image
BASE_SEEN = {"torch": "2.11.0", "torchaudio": "2.11.0", "torchvision": "0.26.0", "transformers": "5.17.0",
             "tokenizers": "0.23.2", "numpy": "2.5.2", "safetensors": "0.8.0", "tiktoken": "0.14.0", "triton": "3.6.0"}  # its pip list
LEFT_OUT = set("""nvidia-cudnn-frontend nvidia-cutlass-dsl anthropic mcp opentelemetry-exporter-otlp torchcodec
  pynvvideocodec tilelang nvtx fastsafetensors quack-kernels tokenspeed-mla humming-kernels""".split())
env = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_system": "Linux", "sys_platform": "linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "os_name": "posix", "extra": ""}
ship = dict(pins, vllm="0.26.0")
errors, warns = [], []
for f in [whl] + sorted(glob.glob(os.path.join(work, "p2", "wheels", "*.whl"))):
    zw = zipfile.ZipFile(f)
    meta = zw.read(next(n for n in zw.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    who = os.path.basename(f).split("-")[0]
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        r = Requirement(line.split(":", 1)[1].strip())
        if r.marker and not r.marker.evaluate(env):
            continue
        n = canon(r.name)
        if n in ship:
            if not r.specifier.contains(Version(ship[n]), prereleases=True):
                errors.append(f"{who} needs {r}, kit has {n}=={ship[n]}")
        elif n in BASE_SEEN:
            if not r.specifier.contains(Version(BASE_SEEN[n]), prereleases=True):
                warns.append(f"{who} asks {r}, GPU base has {BASE_SEEN[n]} (metadata only; --no-deps installs anyway)")
        elif n not in BASE and n not in LEFT_OUT:
            errors.append(f"{who} needs {r}: not shipped, not in the GPU base, not on the left-out list")
for w in warns:
    print("[build] note:", w)
if errors:
    sys.exit("[build] FAIL: requirements:\n  " + "\n  ".join(errors))
print(f"[build] requirements checked: every Requires-Dist is shipped, in the base or left out on purpose")
print(f"[build] {len(lock)} dependency wheels: {mib(tin):.1f} MiB as downloaded -> {mib(tout):.1f} MiB stored")
PYEOF

# 3) part1 (and part3) first: part2's lock records their sha256; deterministic tars, xz -9 single-threaded
# (one block: best ratio)
pack() {  # dir, archive
  ( cd "$1" && find . -mindepth 1 -maxdepth 1 -printf '%P\n' | LC_ALL=C sort | \
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu -cf - -T - ) \
    | xz -9 -T1 -c > "$2.tmp" && mv "$2.tmp" "$2"
}
mkdir -p "$OUT/part1" "$OUT/part2"
rm -rf "$OUT"/part1/*.tar.xz "$OUT"/part2/*.tar.xz "$OUT/part3"
echo "[build] packing part1 (xz -9, a few minutes)"
pack "$WORK/p1" "$OUT/part1/vllm-kit-part1.tar.xz"
P1SHA=$(sha256sum "$OUT/part1/vllm-kit-part1.tar.xz" | cut -d' ' -f1)
P3SHA=""
if [ -d "$WORK/p3" ]; then
  mkdir -p "$OUT/part3"; pack "$WORK/p3" "$OUT/part3/vllm-kit-part3.tar.xz"
  P3SHA=$(sha256sum "$OUT/part3/vllm-kit-part3.tar.xz" | cut -d' ' -f1)
fi
{
  echo "# vLLM 0.26.0 offline kit, built $(date -u +%Y-%m-%dT%H:%MZ) by scripts/vllm_kit/build.sh (cp312, manylinux x86_64)"
  echo "# install: bash scripts/vllm_kit/install.sh KITDIR PREFIX  -> PREFIX/vllm-venv over the base python3"
  echo "[part1]  vllm tree for site-packages, strip 2 of results/VLLM-OFFLINE.md"
  echo "vllm==0.26.0  $(basename "$DL"/vllm/vllm-0.26.0-*.whl)"
  echo "part1-sha256=$P1SHA"
  if [ -n "$P3SHA" ]; then echo "[part3]  vllm/_moe_C_stable_libtorch.abi3.so (VLLM_KIT_KEEP_MOE=1)"; echo "part3-sha256=$P3SHA"; fi
  echo "[part2]  wheels, installed --no-index --no-deps"
  cat "$WORK/deps.lock"
} > "$WORK/p2/kit.lock"
( cd "$WORK/p2" && find . -type f ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort | xargs sha256sum > SHA256SUMS )
echo "[build] packing part2"
pack "$WORK/p2" "$OUT/part2/vllm-kit-part2.tar.xz"

# 4) sizes, lock, refuse anything over the limit
cp "$HERE/install.sh" "$OUT/install.sh"; chmod +x "$OUT/install.sh"
size() { stat -c %s "$1"; }
mibs() { awk "BEGIN{printf \"%.2f\", $1/1048576}"; }
S1=$(size "$OUT/part1/vllm-kit-part1.tar.xz"); S2=$(size "$OUT/part2/vllm-kit-part2.tar.xz"); S3=0
[ -z "$P3SHA" ] || S3=$(size "$OUT/part3/vllm-kit-part3.tar.xz")
{
  cat "$WORK/p2/kit.lock"
  echo "[archives]  (limit $MAX_MIB MiB each)"
  echo "part1/vllm-kit-part1.tar.xz  $S1 bytes  $(mibs "$S1") MiB  sha256=$P1SHA"
  echo "part2/vllm-kit-part2.tar.xz  $S2 bytes  $(mibs "$S2") MiB  sha256=$(sha256sum "$OUT/part2/vllm-kit-part2.tar.xz" | cut -d' ' -f1)"
  [ -z "$P3SHA" ] || echo "part3/vllm-kit-part3.tar.xz  $S3 bytes  $(mibs "$S3") MiB  sha256=$P3SHA"
} > "$OUT/vllm-kit.lock"
echo "[build] part1 $(mibs "$S1") MiB, part2 $(mibs "$S2") MiB$([ -z "$P3SHA" ] || echo ", part3 $(mibs "$S3") MiB") (limit $MAX_MIB MiB each); lock: $OUT/vllm-kit.lock"
fail=0
for s in "$S1" "$S2" "$S3"; do [ "$s" -le $((MAX_MIB * 1048576)) ] || fail=1; done
if [ $fail = 1 ]; then echo "[build] FAIL: an archive is larger than $MAX_MIB MiB: it cannot travel in one run call"; exit 1; fi
echo "[build] OK"
