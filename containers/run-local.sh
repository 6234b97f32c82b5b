#!/usr/bin/env bash
# Run a locally built image the way `docker run --rm --network none` would, with buildah
# (this machine has no container engine, and `podman run` cannot set rlimits here):
#
#   containers/run-local.sh [-v HOST:PATH[:ro]]... [-e NAME=VALUE]... [--user UID[:GID]] \
#       [--entrypoint PROGRAM] IMAGE [ARGUMENT...]
#
# The image's own entry point (or --entrypoint), user, working folder and environment are
# used; the arguments follow the entry point, as with docker. No network: buildah runs inside a new,
# empty network namespace (unshare --net). The working container is removed afterwards and
# the command's exit status is returned.
set -euo pipefail

fail() { echo "run-local.sh: $*" >&2; exit 125; }
volumes=() environment=() user='' entrypoint_override=''
while [[ $# -gt 0 ]]; do
    case $1 in
        -v|--volume) volumes+=(--volume "$2"); shift 2 ;;
        -e|--env) environment+=(--env "$2"); shift 2 ;;
        --user) user=$2; shift 2 ;;
        --entrypoint) entrypoint_override=$2; shift 2 ;;
        --) shift; break ;;
        -*) fail "unknown option $1" ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || fail 'usage: run-local.sh [-v HOST:PATH[:ro]]... [-e NAME=VALUE]... [--user UID[:GID]] [--entrypoint PROGRAM] IMAGE [ARGUMENT...]'
image=$1; shift
for program in buildah unshare python3; do
    command -v "${program}" >/dev/null || fail "${program} is missing"
done

container=$(buildah from --pull=never --quiet "${image}") || fail "no local image ${image}"
trap 'buildah rm "${container}" >/dev/null 2>&1 || true' EXIT
config=$(buildah inspect --type container "${container}")
setting() {  # one field of the image's OCI configuration, from buildah's JSON
    python3 -c 'import json, sys
value = json.loads(sys.argv[1])["OCIv1"]["config"].get(sys.argv[2])
print(*(value if isinstance(value, list) else [value or ""]), sep="\n")' "${config}" "$1"
}
mapfile -t entrypoint < <(setting Entrypoint)
[[ -z ${entrypoint_override} ]] || entrypoint=("${entrypoint_override}")
[[ -n ${user} ]] || user=$(setting User)
[[ -n ${user} ]] || user=0:0

status=0
unshare --net -- buildah run --isolation chroot --network host --user "${user}" \
    "${volumes[@]}" "${environment[@]}" "${container}" -- "${entrypoint[@]}" "$@" || status=$?
exit "${status}"
