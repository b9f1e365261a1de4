# llmemb-dist on Ray's GPU image, for the KubeRay RayJobs in k8s/.
#   docker build -t <registry>/llmemb-dist:0.1.0 .
# rayproject/ray:2.60.0-py311-cu128: the Ray release and Python this package is tested with (every Ray
# pod and the submitter must run the same Ray), on CUDA 12.8, which covers A100 and H100. The image runs
# as the non-root user `ray` (uid 1000, gid 100) that the manifests' securityContext names.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

# Torch does not come with the Ray image: pin the tested release, built for the image's CUDA.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG DEEPSPEED_VERSION=0.19.8
ARG RAY_VERSION=2.60.0

ENV PYTHONUNBUFFERED=1
WORKDIR /home/ray/llmemb-dist

RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
# DeepSpeed's setup imports torch, so it builds against the torch above rather than in isolation.
RUN pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users llmemb_dist ./llmemb_dist
# Ray stays at the image's version; torch and deepspeed stay as installed above.
RUN pip install --no-cache-dir . "ray[train,data,default,serve]==${RAY_VERSION}" \
        "torch==${TORCH_VERSION}" "deepspeed==${DEEPSPEED_VERSION}"

# The launch scripts and configs are the RayJob entrypoints' working_dir; the RayService reads its
# config file here too (k8s/render.py).
COPY --chown=ray:users launch ./launch
COPY --chown=ray:users configs ./configs
