# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# torch is installed from its pin first: a bare `torch` requirement would make
# pip fetch a multi-GB CUDA build. Override TORCH_SPEC to pick another build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.grulab-installed

.PHONY: demo test bench clean cjk-font

$(STAMP): pyproject.toml setup.py $(wildcard src/grulab/kernels/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" "setuptools>=68" wheel ninja
	@echo "grulab: installing, and compiling the native GRU kernel for every x86-64 CPU (about a minute) ..."
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	$(VENV)/bin/grulab kernels
	@$(MAKE) --no-print-directory cjk-font
	touch $(STAMP)

# Chinese in the figures (tang300, the notebooks) needs a CJK font. On Debian, as root, install the
# small WenQuanYi Micro Hei (fonts-noto-cjk is the bigger alternative); elsewhere say what to install.
# Without one the figures still work and warn once.
cjk-font:
	@if fc-list :lang=zh 2>/dev/null | grep -q . || ls /usr/share/fonts/truetype/wqy/*.tt? /usr/share/fonts/opentype/noto/*CJK* >/dev/null 2>&1; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "grulab: installing a CJK font for Chinese in figures (fonts-wqy-microhei) ..."; \
		apt-get update -qq || true; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fonts-wqy-microhei >/dev/null \
			|| echo "warning: could not install fonts-wqy-microhei; figures will show Chinese as empty boxes" >&2; \
	else \
		echo "note: no CJK font found; figures will show Chinese as empty boxes: install fonts-noto-cjk or fonts-wqy-microhei (Debian/Ubuntu), or any Noto Sans CJK, WenQuanYi, Source Han Sans, PingFang, Microsoft YaHei or SimHei" >&2; \
	fi

demo: $(STAMP)
	$(VENV)/bin/grulab demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_gru.py --write-results
	$(PY) benchmarks/bench_grid.py --write-results

clean:
	rm -rf $(VENV) build src/*.egg-info src/grulab/kernels/_native*.so src/grulab/_native*.so
