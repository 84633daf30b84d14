# workerpool-operator: build, lint and test, with a local Kubernetes cluster (hack/cluster.sh)
# that needs no Docker. `make help` lists the targets.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
# the local cluster's state directory (hack/cluster.sh reads WP_STATE too)
WP_STATE ?= /tmp/workerpool-cluster
export WP_STATE
KUBECONFIG_LOCAL := $(WP_STATE)/kubeconfig

.PHONY: help build crds lint tools unit integration deploy-test test images cluster-up cluster-down cluster-status bench demo

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

build: ## cargo build
	$(CARGO) build

crds: ## regenerate crds/workerpool.yaml from the Rust types, and its copies in the chart and deploy/manifests
	$(CARGO) run -q -- crd > crds/workerpool.yaml.tmp
	mv -f crds/workerpool.yaml.tmp crds/workerpool.yaml
	cp crds/workerpool.yaml deploy/helm/workerpool-operator/crds/workerpool.yaml
	hack/render-manifests.sh

tools: ## make sure rustfmt and clippy are installed
	@for c in rustfmt clippy; do \
	  rustup component list --installed 2>/dev/null | grep -q "^$$c" || rustup component add $$c; \
	done

lint: tools ## cargo fmt --check, cargo clippy (warnings are errors), the CRD and deploy files are fresh
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	hack/check-deploy.sh

unit: ## unit tests (no cluster needed)
	$(CARGO) test --lib --bins

integration: ## integration tests against the running local cluster (make cluster-up images)
	KUBECONFIG=$(KUBECONFIG_LOCAL) $(CARGO) test --no-fail-fast --test '*' -- --test-threads=2

deploy-test: ## the Helm chart and deploy/manifests installed into the running local cluster (hack/test-deploy.sh)
	KUBECONFIG=$(KUBECONFIG_LOCAL) hack/test-deploy.sh

test: unit ## unit tests, then images, integration and deploy tests on the local cluster (started and stopped if it was not up)
	hack/with-cluster.sh $(MAKE) --no-print-directory images integration deploy-test

images: ## build the images and import them into the running cluster
	hack/images.sh

cluster-up: ## start the local cluster (installs packages and builds Kubernetes the first time)
	hack/cluster.sh up

cluster-down: ## stop the local cluster and remove everything it left
	hack/cluster.sh down

cluster-status: ## is the local cluster up and healthy?
	hack/cluster.sh status

bench: ## benchmarks (hack/bench.sh)
	hack/bench.sh

demo: ## local cluster, images, the CRD; see hack/demo.sh
	hack/demo.sh
