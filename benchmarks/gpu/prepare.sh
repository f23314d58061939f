#!/usr/bin/env bash
# Download the wheels of wheels.txt for the GPU machine (CPython 3.12, manylinux x86_64) into the repository's
# ignored .whl/, check they fit the 56 MiB the repository may carry there, and list them.
#   benchmarks/gpu/prepare.sh            # on a machine with PyPI; then run.sh on the GPU machine
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dest="$root/.whl"
limit_mib=${WHEELS_LIMIT_MIB:-56}
python=${PYTHON:-python3}
mkdir -p "$dest"
mapfile -t specs < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$here/wheels.txt" | grep -v '^$')
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --dest "$dest" "${specs[@]}"
# Only the wheels wheels.txt names stay (an older download of another version would be carried too).
"$python" - "$dest" "$limit_mib" "${specs[@]}" <<'PY'
import re, sys
from pathlib import Path

dest, limit = Path(sys.argv[1]), float(sys.argv[2])
def norm(name):
    return re.sub(r"[-_.]+", "_", name).lower()
wanted = {(norm(spec.split("==")[0]), spec.split("==")[1]) for spec in sys.argv[3:]}
kept = []
for wheel in sorted(dest.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    if (norm(name), version) in wanted:
        kept.append(wheel)
    else:
        wheel.unlink()
        print(f"removed {wheel.name} (not in wheels.txt)")
missing = wanted - {(norm(w.name.split("-")[0]), w.name.split("-")[1]) for w in kept}
total = sum(w.stat().st_size for w in kept) / 2**20
for wheel in kept:
    print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
print(f"{total:7.2f} MiB  total in {dest} ({len(kept)} wheels; limit {limit:g} MiB)")
if missing:
    sys.exit(f"missing: {sorted(missing)}")
if total > limit:
    sys.exit(f"{total:.1f} MiB of wheels is over the {limit:g} MiB limit")
PY
