#!/usr/bin/env bash
# Build the nas-janitor container images without any container registry.
#
#   deploy/build-images.sh [STEP...]      STEP: wheelhouse | base | agent | controller | all
#
# Steps (default: all):
#   wheelhouse  wheels of the project and its pinned dependencies, made on this host
#               (`pip wheel` of the project, `pip download` of the dependencies for the
#               image's Python), into $CACHE_DIR/wheelhouse. The image builds install
#               only from it (`pip install --no-index`), so a build needs no index.
#   base        a Debian bookworm base image when BASE_IMAGE is not given: made once with
#               `debootstrap --variant=minbase` into a cached tarball
#               ($CACHE_DIR/debian-bookworm-minbase.tar.gz), then `docker import`ed.
#   agent       the agent image (agent/Dockerfile)
#   controller  the controller image (controller/Dockerfile)
#
# Environment:
#   DOCKER_HOST   the daemon that builds and keeps the images (the docker CLI's usual variable)
#   BASE_IMAGE    build on this image instead of the bootstrapped Debian one
#                 (e.g. python:3.11-slim-bookworm when a registry is reachable)
#   IMAGE_TAG     tag of both images (default: the version in pyproject.toml)
#   AGENT_IMAGE, CONTROLLER_IMAGE   image names (default nas-janitor-agent, nas-janitor-controller)
#   CACHE_DIR     where the rootfs tarball (and by default the wheelhouse) live
#                 (default: <repo>/.cache)
#   WHEELHOUSE    the wheelhouse folder (default: $CACHE_DIR/wheelhouse)
#   PYTHON        the Python that runs pip on this host (default: <repo>/.venv/bin/python)
#   PY_TARGET     Python version of the image (default 3.11: Debian bookworm's python3)
#   GLIBC         glibc version of the image, for the manylinux wheel tags it accepts
#                 (default 2.36: Debian bookworm)
#   DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR   default: the ones apt uses on this host
#   REBOOTSTRAP=1 make the rootfs tarball again even when it is cached
#
# Prints how long each step took and the size of each image.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

CACHE_DIR="${CACHE_DIR:-$REPO/.cache}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
PY_TARGET="${PY_TARGET:-3.11}"
ARCH="$(uname -m)"
GLIBC="${GLIBC:-2.36}"
VERSION="$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n1)"
IMAGE_TAG="${IMAGE_TAG:-$VERSION}"
AGENT_IMAGE="${AGENT_IMAGE:-nas-janitor-agent}"
CONTROLLER_IMAGE="${CONTROLLER_IMAGE:-nas-janitor-controller}"
LOCAL_BASE="nas-janitor-base:bookworm"
ROOTFS_TAR="$CACHE_DIR/debian-bookworm-minbase.tar.gz"
WHEELHOUSE="${WHEELHOUSE:-$CACHE_DIR/wheelhouse}"

log() { printf '[build-images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

timed() {  # timed NAME CMD...: runs CMD and reports its wall time
    local name="$1" start end
    shift
    start=$(date +%s%N)
    "$@"
    end=$(date +%s%N)
    local ds=$(((end - start) / 100000000))  # tenths of a second
    printf '[build-images] step %-10s %4d.%d s\n' "$name" $((ds / 10)) $((ds % 10)) >&2
}

# The first "deb" URI that apt on this host uses for SUITE (deb822 or one-line sources).
apt_mirror() {
    local suite="$1"
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        awk -v suite="$suite" '
            BEGIN { RS = ""; FS = "\n" }
            {
                uri = ""; ok_suite = 0; ok_type = 0
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^#/) continue
                    if ($i ~ /^Types:/ && $i ~ /[ \t]deb([ \t]|$)/) ok_type = 1
                    if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
                    if ($i ~ /^Suites:/) {
                        n = split($i, s, /[ \t]+/)
                        for (j = 2; j <= n; j++) if (s[j] == suite) ok_suite = 1
                    }
                }
                if (ok_type && ok_suite && uri != "") { print uri; exit }
            }' "$f"
    done
    { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } \
        | awk -v suite="$suite" '$1 == "deb" && $0 !~ /^#/ {
              i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
              if ($(i + 1) == suite) { print $i; exit } }'
    return 0
}

step_wheelhouse() {
    [ -x "$PYTHON" ] || die "no Python at $PYTHON (run 'make venv' or set PYTHON)"
    # Made aside and renamed into place: a build running meanwhile never sees half of it.
    local final="$WHEELHOUSE" WHEELHOUSE
    mkdir -p "$(dirname "$final")"
    WHEELHOUSE="$(mktemp -d "$final.new.XXXXXX")"
    # The project itself (pure Python), from the work tree's files that git tracks or
    # would track, copied to a fresh folder: no stale build/ output of an earlier build
    # can slip into the wheel, and nothing is written into the work tree.
    local src
    src="$(mktemp -d)"
    git -C "$REPO" ls-files -z --cached --others --exclude-standard \
        | tar -C "$REPO" --null --files-from=- --ignore-failed-read -c 2>/dev/null \
        | tar -C "$src" -x
    "$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$WHEELHOUSE" "$src"
    rm -rf "$src"
    local project_wheel
    project_wheel="$(ls "$WHEELHOUSE"/nas_janitor-*.whl)"
    # Its dependencies, pinned by deploy/constraints.txt, as binary wheels for the
    # image's Python and platform (not this host's), so the build compiles nothing.
    # pip takes each accepted platform tag literally: list every manylinux_2_N up to glibc's.
    local platforms=() minor
    for ((minor = ${GLIBC#*.}; minor >= 5; minor--)); do
        platforms+=(--platform "manylinux_${GLIBC%%.*}_${minor}_${ARCH}")
    done
    platforms+=(--platform "manylinux2014_${ARCH}" --platform "linux_${ARCH}")
    "$PYTHON" -m pip download -q --dest "$WHEELHOUSE" \
        --only-binary=:all: --python-version "$PY_TARGET" --implementation cp \
        "${platforms[@]}" \
        --constraint "$REPO/deploy/constraints.txt" \
        "$project_wheel"
    chmod 0755 "$WHEELHOUSE"
    rm -rf "$final"
    mv "$WHEELHOUSE" "$final"
    log "wheelhouse: $(find "$final" -name "*.whl" | wc -l) wheels in $final"
}

make_rootfs_tarball() {
    command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
    local mirror security rootfs
    mirror="${DEBIAN_MIRROR:-$(apt_mirror bookworm | head -n1 || true)}"
    mirror="${mirror:-http://deb.debian.org/debian}"
    security="${DEBIAN_SECURITY_MIRROR:-$(apt_mirror bookworm-security | head -n1 || true)}"
    security="${security:-http://deb.debian.org/debian-security}"
    local old tmp_tar
    # Under the cache lock (step_base), so these are left by a killed run, not in use.
    for old in "$CACHE_DIR"/rootfs.*/; do remove_rootfs "${old%/}"; done
    rootfs="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
    log "debootstrap --variant=minbase bookworm from $mirror"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$CACHE_DIR/debootstrap.log" 2>&1 \
        || { tail -n 20 "$CACHE_DIR/debootstrap.log" >&2; remove_rootfs "$rootfs"
             die "debootstrap failed"; }
    # apt inside the image builds: same mirrors as this host, with updates and security.
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF
    # Keep the image small: no package cache, no lists, no docs, no man pages.
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/01-nodoc" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
EOF
    cat >"$rootfs/etc/apt/apt.conf.d/01-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
EOF
    find "$rootfs"/var/lib/apt/lists -type f -delete
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/log/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
        "$rootfs"/usr/share/info/* "$rootfs"/tmp/*
    find "$rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias \
        -exec rm -rf {} +
    # mktemp made the folder 0700: that would be the image's "/", closed to non-root users.
    chmod 0755 "$rootfs"
    # A fixed mtime for every file so the same package set gives the same tarball.
    tmp_tar="$(mktemp "$ROOTFS_TAR.XXXXXX")"
    tar --one-file-system --numeric-owner --sort=name --mtime='2023-06-10 00:00Z' \
        -C "$rootfs" -c . | gzip -n >"$tmp_tar"
    chmod 0644 "$tmp_tar"
    mv "$tmp_tar" "$ROOTFS_TAR"
    remove_rootfs "$rootfs"
}

# debootstrap mounts proc and sys in the target and unmounts them when it exits; should
# one be left (a killed run), unmount it before deleting so nothing outside is touched.
remove_rootfs() {
    local dir="$1" m
    [ -d "$dir" ] || return 0
    awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r \
        | while read -r m; do umount "$m" || umount -l "$m"; done
    rm -rf --one-file-system "$dir"
}

step_base() {
    if [ -n "${BASE_IMAGE:-}" ]; then
        log "base: using BASE_IMAGE=$BASE_IMAGE"
        return
    fi
    # One bootstrap at a time per cache folder; a run that waited reuses what the other made.
    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/rootfs.lock"
    flock 9
    if [ "${REBOOTSTRAP:-0}" = 1 ] || [ ! -s "$ROOTFS_TAR" ]; then
        make_rootfs_tarball
    else
        log "base: reusing $ROOTFS_TAR"
    fi
    exec 9>&-
    local digest
    digest="$(sha256sum "$ROOTFS_TAR" | cut -c1-12)"
    if docker image inspect "nas-janitor-base:$digest" >/dev/null 2>&1; then
        log "base: nas-janitor-base:$digest already imported"
    else
        docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change 'CMD ["/bin/bash"]' \
            "$ROOTFS_TAR" "nas-janitor-base:$digest" >/dev/null
    fi
    docker tag "nas-janitor-base:$digest" "$LOCAL_BASE"
}

build_image() {  # build_image COMPONENT IMAGE
    local component="$1" image="$2"
    [ -d "$WHEELHOUSE" ] || die "no wheelhouse at $WHEELHOUSE (run the wheelhouse step)"
    local base="${BASE_IMAGE:-$LOCAL_BASE}" context rc=0
    # The build context is a copy of the wheelhouse alone: small, and untouched by
    # anything else running meanwhile (another build, a new wheelhouse).
    context="$(mktemp -d)"
    cp -a "$WHEELHOUSE" "$context/wheels"
    # --network host: apt-get in the build reaches the mirror even when the daemon has no
    # bridge network (dockerd --bridge=none); it changes nothing in the image.
    DOCKER_BUILDKIT=0 docker build -q --force-rm --network host \
        --file "$REPO/$component/Dockerfile" \
        --build-arg "BASE_IMAGE=$base" \
        --build-arg "WHEELHOUSE=wheels" \
        --build-arg "VERSION=$VERSION" \
        --tag "$image:$IMAGE_TAG" --tag "$image:latest" \
        "$context" >/dev/null || rc=$?
    rm -rf "$context"
    return "$rc"
}

step_agent() { build_image agent "$AGENT_IMAGE"; }
step_controller() { build_image controller "$CONTROLLER_IMAGE"; }

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(all)
for s in "${steps[@]}"; do
    case "$s" in
        all) timed wheelhouse step_wheelhouse; timed base step_base
             timed agent step_agent; timed controller step_controller ;;
        wheelhouse|base|agent|controller) timed "$s" "step_$s" ;;
        *) die "unknown step '$s' (wheelhouse, base, agent, controller, all)" ;;
    esac
done
for s in "${steps[@]}"; do
    case "$s" in
        all|agent|controller)
            docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' \
                | grep -E "^($AGENT_IMAGE|$CONTROLLER_IMAGE):$IMAGE_TAG " >&2 || true
            break ;;
    esac
done
