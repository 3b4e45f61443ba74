#!/usr/bin/env bash
# Offline install of the vLLM 0.26.0 kit (scripts/vllm_kit/build.sh) on the GPU machine: no network, no resolver.
#
#   bash scripts/vllm_kit/install.sh KITDIR PREFIX     (the parts in KITDIR/ or KITDIR/part1/, KITDIR/part2/;
#                                                       part3 = _moe_C, only for a kit built with VLLM_KIT_KEEP_MOE=1)
#
# Creates PREFIX/vllm-venv over BASE_PY with --system-site-packages (torch 2.11.0+cu130, triton, transformers 5.17,
# numpy, aiohttp's attrs, ... come from the base, which is never modified); installs part2's wheels
# --no-index --no-deps, untars part1's stripped vllm tree into the venv's site-packages. Idempotent: a venv whose
# stamp matches these archives is reused (a warm machine); anything else under PREFIX/vllm-venv is replaced.
# env: BASE_PY        interpreter to layer over (default /opt/torch/.venv/bin/python3 if present, else python3)
#      CHECK_IMPORT=1 also import vllm's api_server module at the end (GPU machine, ~20-60 s)
#      ALLOW_NO_TORCH=1  skip the torch checks (only to test this script on a machine without torch 2.11)
set -eu
KIT="${1:?usage: bash install.sh KITDIR PREFIX}"
PREFIX="${2:?usage: bash install.sh KITDIR PREFIX}"
if [ -z "${BASE_PY:-}" ]; then
  if [ -x /opt/torch/.venv/bin/python3 ]; then BASE_PY=/opt/torch/.venv/bin/python3; else BASE_PY="$(command -v python3)"; fi
fi
T0=$SECONDS
find_part() {  # n -> path of vllm-kit-part<n>.tar.xz, or a clear failure
  for p in "$KIT/vllm-kit-part$1.tar.xz" "$KIT/part$1/vllm-kit-part$1.tar.xz"; do [ -f "$p" ] && { echo "$p"; return; }; done
  echo "[vllm-kit] FAIL: part $1 missing: no vllm-kit-part$1.tar.xz in $KIT or $KIT/part$1" >&2
  [ "$1" = 2 ] || echo "[vllm-kit] part$1 travels in its own run call (scripts/device_vllm.sh stash $1) and lives only on a warm machine" >&2
  return 1
}
P1="$(find_part 1)" || exit 1
P2="$(find_part 2)" || exit 1
mkdir -p "$PREFIX"; PREFIX="$(cd "$PREFIX" && pwd)"
VENV="$PREFIX/vllm-venv"
P3="$(find_part 3 2>/dev/null)" || P3=""   # required below only if part2's lock names a part3
STAMP="$(cat "$P1" "$P2" ${P3:+"$P3"} | sha256sum | cut -d' ' -f1)"
if [ -f "$VENV/.vllm-kit-stamp" ] && [ "$(cat "$VENV/.vllm-kit-stamp")" = "$STAMP" ]; then
  echo "[vllm-kit] OK (reused $VENV: same kit, a warm machine) | $(cat "$VENV/.vllm-kit-summary")"
  exit 0
fi

"$BASE_PY" - <<PYEOF
import sys
print("[vllm-kit] base python:", sys.executable, sys.version.split()[0])
assert sys.version_info[:2] == (3, 12), "the kit is built for CPython 3.12"
if "${ALLOW_NO_TORCH:-0}" != "1":
    import torch
    assert torch.__version__.startswith("2.11.0"), f"vllm 0.26.0 is built against torch 2.11.0, base has {torch.__version__}"
PYEOF

WORK="$(mktemp -d "${TMPDIR:-/tmp}/vllm-kit.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
unxz() { if command -v xz >/dev/null 2>&1; then xz -dc -T0 "$1"; else "$BASE_PY" -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)" "$1"; fi; }

# 1) part2 (wheels + lock), verified; the lock names part1's sha256: a part1 from another build is refused
unxz "$P2" | tar -C "$WORK" -xf -
( cd "$WORK" && sha256sum -c --quiet SHA256SUMS ) || { echo "[vllm-kit] FAIL: part2 checksum mismatch"; exit 1; }
WANT="$(sed -n 's/^part1-sha256=//p' "$WORK/kit.lock")"
HAVE="$(sha256sum "$P1" | cut -d' ' -f1)"
[ "$WANT" = "$HAVE" ] || { echo "[vllm-kit] FAIL: $P1 is not the part1 of this part2 (sha256 $HAVE, lock wants $WANT): rebuild or re-stash"; exit 1; }
WANT3="$(sed -n 's/^part3-sha256=//p' "$WORK/kit.lock")"
if [ -n "$WANT3" ]; then
  [ -n "$P3" ] || { find_part 3; exit 1; }
  [ "$(sha256sum "$P3" | cut -d' ' -f1)" = "$WANT3" ] || { echo "[vllm-kit] FAIL: $P3 is not the part3 of this part2"; exit 1; }
  unxz "$P3" | tar -C "$WORK" -xf -
fi
echo "[vllm-kit] part2 unpacked + verified in $((SECONDS - T0)) s"

# 2) the venv. A venv made from a venv's python (the base is /opt/torch/.venv) sees only the *root* interpreter's
# site dir even with --system-site-packages: add the base's site dirs with a .pth (as the SGLang kit does),
# appended after the venv's own site-packages so the kit's wheels win where both have a package (aiohttp).
rm -rf "$VENV"
"$BASE_PY" -m venv --system-site-packages --without-pip "$VENV"
VSITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$BASE_PY" - "$VSITE/_base_site.pth" <<'PYEOF'
import site, sys, sysconfig
dirs = []
for d in [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]:
    if d not in dirs:
        dirs.append(d)
with open(sys.argv[1], "w") as f:
    f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
PYEOF
"$VENV/bin/python" -m pip --version >/dev/null 2>&1 || { echo "[vllm-kit] FAIL: base python has no pip"; exit 1; }
NW=$(ls "$WORK"/wheels/*.whl | wc -l)
# pip comes from the base (through the .pth); --ignore-installed: install into the venv even where the base has
# the package; --no-compile: the first import writes __pycache__
"$VENV/bin/python" -m pip install -q --isolated --no-index --no-deps --ignore-installed --no-compile --no-cache-dir \
  --disable-pip-version-check --no-warn-script-location "$WORK"/wheels/*.whl > "$WORK/pip.log" 2>&1 \
  || { echo "[vllm-kit] FAIL: pip install of part2's wheels:"; cat "$WORK/pip.log"; exit 1; }
echo "[vllm-kit] $NW wheels installed in $((SECONDS - T0)) s"

# 3) part1: the stripped vllm tree straight into site-packages (+ part3's _moe_C, kits built with KEEP_MOE)
unxz "$P1" | tar -C "$VSITE" -xf -
# the stripped kit has no FlashAttention .so, and vllm_flash_attn raises at import without one (every model imports
# it through fa_utils); the TRITON_ATTN backend (--attention-backend) never calls it
sed -i "s/^if not (FA2_AVAILABLE or FA3_AVAILABLE):$/if False:  # splitrl: FA2\/FA3 .so stripped from the offline kit/" \
  "$VSITE/vllm/vllm_flash_attn/__init__.py"
[ -d "$WORK/extra/vllm" ] && cp -a "$WORK/extra/vllm/." "$VSITE/vllm/"
printf '%s\n' "#!$VENV/bin/python" "import sys" "from vllm.entrypoints.cli.main import main" "sys.exit(main())" > "$VENV/bin/vllm"
chmod +x "$VENV/bin/vllm"

# 4) one version line (metadata only: no GPU needed), then the stamp that makes a rerun reuse this venv
VQ='import sys
from importlib.metadata import version
def v(p):
    try: return version(p)
    except Exception: return "-"
print(" ".join(f"{p}={v(p)}" for p in sys.argv[1:]))'
SUM="vllm-venv: $("$VENV/bin/python" -c "$VQ" vllm flashinfer-python transformers tokenizers pydantic fastapi openai xgrammar)"
if [ "${ALLOW_NO_TORCH:-0}" = 1 ]; then SUM="$SUM torch=-"; else
  SUM="$SUM $("$VENV/bin/python" -c 'import torch; print(f"torch={torch.__version__}")')"; fi
MOE=""; [ -d "$WORK/extra/vllm" ] && MOE=" + _moe_C"
SUM="$SUM | $NW wheels$MOE | python=$VENV/bin/python"
echo "$SUM" > "$VENV/.vllm-kit-summary"
echo "$STAMP" > "$VENV/.vllm-kit-stamp"
echo "[vllm-kit] OK in $((SECONDS - T0)) s | $SUM"

if [ "${CHECK_IMPORT:-0}" = 1 ]; then
  ( cd "$WORK" && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
      "$VENV/bin/python" -c 'import vllm, vllm.entrypoints.openai.api_server; print("[vllm-kit] import vllm api_server OK", vllm.__version__)' )
fi
