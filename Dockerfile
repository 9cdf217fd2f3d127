# The piimage builder: Python, piimage and every system tool `piimage build` needs, so a machine
# with only Docker can make node images.  Run it through scripts/piimage-docker, which passes the
# devices and capabilities the package step needs (see there); README.md "Build in Docker".
#
#   docker build -t piimage .                                   # Debian 12, from Docker Hub
#   docker build --build-arg BASE_IMAGE=my/debian:bookworm -t piimage .
ARG BASE_IMAGE=debian:bookworm
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8

# System packages: the same RUNTIME_PACKAGES list scripts/piimage installs on a host (one list,
# in scripts/bootstrap.sh), plus PYTHON_PACKAGES, Debian's builds of piimage's Python
# dependencies: the image is then made from Debian's mirror alone (no PyPI, whose TLS a
# build container may not be able to verify behind a corporate proxy). Only bootstrap.sh is
# copied first, so editing the Python code does not re-run apt.
COPY scripts/bootstrap.sh /opt/piimage/scripts/bootstrap.sh
RUN source /opt/piimage/scripts/bootstrap.sh \
 && ensure_packages "${RUNTIME_PACKAGES[@]}" "${PYTHON_PACKAGES[@]}" \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

# libguestfs: direct backend with TCG (no /dev/kvm is passed into the container). Its appliance
# is built on first use and kept on the cache volume: built here it would cost 4 GB in the image
# (the appliance's root is a sparse file, and image layers are not sparse).
ENV LIBGUESTFS_BACKEND=direct \
    LIBGUESTFS_BACKEND_SETTINGS=force_tcg \
    LIBGUESTFS_CACHEDIR=/cache/libguestfs

# The venv from Debian's python3 with its site packages, so Debian's python3-guestfs imports.
# A plain (non-editable) install, offline: every dependency is already there from Debian.
# stages/ and node-profiles/ ship as package data (src/piimage/data/ links to them, so they
# are copied in before the install); PIIMAGE_DATA_DIR points at the same copies.
RUN /usr/bin/python3 -m venv --system-site-packages /opt/piimage/venv
COPY pyproject.toml README.md /opt/piimage/
COPY stages /opt/piimage/stages
COPY node-profiles /opt/piimage/node-profiles
COPY src /opt/piimage/src
RUN /opt/piimage/venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check \
      --no-index --no-build-isolation /opt/piimage \
 && rm -rf /opt/piimage/build /opt/piimage/src/*.egg-info \
 && /opt/piimage/venv/bin/python -c 'import guestfs, piimage.cli'
COPY scripts/docker-entrypoint /usr/local/bin/piimage-entrypoint

ENV PATH=/opt/piimage/venv/bin:$PATH \
    PIIMAGE_DATA_DIR=/opt/piimage \
    PIIMAGE_CACHE=/cache \
    PIIMAGE_LAYER_CACHE=/cache/layers \
    PIIMAGE_APT_CACHE=/cache/apt-archives
# Downloads, decompressed bases, role layers and the apt archive cache: keep them between runs.
VOLUME /cache
# The user's cluster.yaml, .piimage/secrets and out/ (scripts/piimage-docker mounts $PWD here).
WORKDIR /work
# piimage itself, behind a small wrapper: loop device nodes, ownership of what it wrote.
ENTRYPOINT ["/usr/local/bin/piimage-entrypoint"]
CMD ["--help"]
