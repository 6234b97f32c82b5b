#!/usr/bin/env bash
# Build containers/Dockerfile with buildah on a machine that has no container engine and no
# image registry, only Debian's and PyPI's package servers (this project's CI machines).
#
#   containers/build-local.sh [TAG]          # default cahal-bids:local; root, buildah, mmdebstrap
#
# What differs from `docker build -f containers/Dockerfile .`, and nothing else:
# 1. The recipe's base image (its PYTHON_IMAGE, python:3.11.11-slim-bookworm) cannot be
#    pulled. A stand-in is made from Debian bookworm packages with mmdebstrap (Debian's
#    Python 3.11 and pip rather than python.org's build in /usr/local) and tagged with the
#    base's name, so the recipe's FROM lines are used as they are. Its root file system is
#    cached (CAHAL_CONTAINER_CACHE, default ~/.cache/cahal-bids/containers) under the hash of
#    the mmdebstrap command, and the stand-in image is rebuilt only when that hash changes.
# 2. For the build steps only, three host folders are mounted, none copied into the image:
#    the host's CA bundle (pip reaches PyPI through it), a folder with torch's CPU wheel
#    (TORCH_WHEELS, default /opt/wheels; the recipe's download.pytorch.org is unreachable)
#    searched through the recipe's PIP_FIND_LINKS argument, and an offline TemplateFlow home
#    (TEMPLATEFLOW_OFFLINE, default ../shared/data/templateflow) that the recipe copies the
#    template from instead of fetching it.
# Builds run with chroot isolation (`podman run` and OCI isolation cannot set rlimits here).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tag=${1:-cahal-bids:local}
cache=${CAHAL_CONTAINER_CACHE:-${HOME}/.cache/cahal-bids/containers}
wheels=${TORCH_WHEELS:-/opt/wheels}
templateflow=${TEMPLATEFLOW_OFFLINE:-${repo}/../shared/data/templateflow}
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

fail() { echo "build-local.sh: $*" >&2; exit 1; }
for program in buildah mmdebstrap; do
    command -v "${program}" >/dev/null || fail "${program} is missing (make system-deps installs it)"
done
[[ $(id -u) == 0 ]] || fail 'buildah with chroot isolation needs root here'
[[ -s ${ca_bundle} ]] || fail "no CA bundle at ${ca_bundle} (set CA_BUNDLE)"
[[ -f ${templateflow}/tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz ]] \
    || fail "no MNI152NLin2009cAsym 1 mm T1w under ${templateflow} (set TEMPLATEFLOW_OFFLINE)"
compgen -G "${wheels}/torch-*.whl" >/dev/null || fail "no torch wheel in ${wheels} (set TORCH_WHEELS)"

# --- 1. the stand-in base image ------------------------------------------------------
base=$(sed -n 's/^ARG PYTHON_IMAGE=//p' "${repo}/containers/Dockerfile")
[[ -n ${base} ]] || fail 'containers/Dockerfile names no PYTHON_IMAGE'
# python-is-python3: the recipe calls `python`; passwd: useradd; ca-certificates: Debian's
# own bundle, as in the official image. pip may install into the system Python, as it may
# in the official image (Debian marks it externally managed).
packages=python3,python3-pip,python-is-python3,passwd,ca-certificates
hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED; rm -rf "$1"/var/lib/apt/lists/*'
recipe="mmdebstrap --variant=minbase --include=${packages} bookworm | ${hook}"
key=$(printf '%s' "${recipe}" | sha256sum | cut -c1-16)
rootfs=${cache}/debian-bookworm-python-${key}.tar
have=$(buildah inspect --type image --format '{{index .ImageAnnotations "org.cahal-bids.base-recipe"}}' \
    "localhost/${base}" 2>/dev/null || true)
if [[ ${have} != "${key}" ]]; then
    if [[ ! -s ${rootfs} ]]; then
        mkdir -p "${cache}"
        echo "build-local.sh: Debian bookworm root file system -> ${rootfs}"
        mmdebstrap --quiet --variant=minbase --include="${packages}" --format=tar \
            --customize-hook="${hook}" bookworm "${rootfs%.tar}.partial.tar"
        mv "${rootfs%.tar}.partial.tar" "${rootfs}"
    fi
    echo "build-local.sh: stand-in base image localhost/${base}"
    container=$(buildah from scratch)
    trap 'buildah rm "${container}" >/dev/null 2>&1 || true' EXIT
    buildah add --quiet "${container}" "${rootfs}" /
    buildah config \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd python3 \
        --annotation "org.cahal-bids.base-recipe=${key}" \
        --label "org.cahal-bids.stand-in-for=docker.io/library/${base}" "${container}"
    buildah commit --quiet --rm "${container}" "localhost/${base}" >/dev/null
    trap - EXIT
fi

# --- 2. the recipe, unchanged --------------------------------------------------------
version=$(sed -n "s/^__version__ = '\(.*\)'$/\1/p" "${repo}/cahal_bids/__init__.py")
revision=$(git -C "${repo}" rev-parse HEAD 2>/dev/null || echo unknown)
echo "build-local.sh: buildah bud -> ${tag}"
buildah bud --isolation chroot --network host --pull=never --layers \
    --volume "${ca_bundle}:/etc/ssl/certs/ca-certificates.crt:ro" \
    --volume "${wheels}:/run/torch-wheels:ro" \
    --volume "$(cd "${templateflow}" && pwd):/run/templateflow-offline:ro" \
    --build-arg PIP_FIND_LINKS=/run/torch-wheels \
    --build-arg TORCH_INDEX=https://pypi.org/simple \
    --build-arg CAHAL_VERSION="${version}" \
    --build-arg VCS_REF="${revision}" \
    --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -f "${repo}/containers/Dockerfile" -t "${tag}" "${repo}"
