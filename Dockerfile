# cryoavg on a CUDA PyTorch base image. Data and outputs are mounted volumes:
#   docker build -t cryoavg .
#   docker run --gpus all --rm -v "$PWD":/data cryoavg class2d particles=Extract/job012/particles.star
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/cryoavg
COPY pyproject.toml README.md ./
COPY constraints ./constraints
COPY configs ./configs
COPY cryoavg ./cryoavg
# non-editable install; the base image's CUDA torch satisfies the torch requirement
RUN pip install . && rm -rf /opt/cryoavg/build

RUN useradd --create-home --uid 1000 cryoavg
USER cryoavg
WORKDIR /data
VOLUME ["/data"]
ENTRYPOINT ["cryoavg"]
CMD ["--help"]
