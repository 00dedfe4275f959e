# Stand-in for pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime where no registry can be reached:
# Debian's Python with torch and torchvision installed by pip into /opt/conda (the official image's
# prefix), so `python` and `pip` are on PATH as they are there. torch is PyPI's default Linux build,
# whose CUDA version is whatever that wheel was built with (docker/README.md).
FROM localhost/debian:bookworm
ARG TORCH=2.14.1
ARG TORCHVISION=0.29.1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/conda
ENV PATH=/opt/conda/bin:$PATH
RUN pip install --no-cache-dir "torch==${TORCH}" "torchvision==${TORCHVISION}" \
    && python -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
WORKDIR /workspace
