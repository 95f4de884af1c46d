#!/bin/bash
# Two end-to-end runs in one device call (see session_e2e.sh): the MLA model (DeepSeek-V2-Lite shape, K8V4: MLA's
# rope part stays 8-bit) on the newest release that serves, then the MHA model (Qwen2.5-7B shape) on 0.5.17.
set -u
TAG=mla_0523 SGLANG_RELEASE=${NEW_RELEASE:-0.5.23} FALLBACK="" BUDGET=${BUDGET1:-200} \
  PLAN=${PLAN1:-l2:bf16,l2:k8v4} EXTRA="--model-dir /tmp/dsv2_lite --capture l2:k8v4" bash scripts/device/session_e2e.sh
TAG=mha_0517 SGLANG_RELEASE=0.5.17 FALLBACK="" BUDGET=${BUDGET2:-200} \
  PLAN=${PLAN2:-l2:bf16,l2:kv4,l3:kv4} bash scripts/device/session_e2e.sh
