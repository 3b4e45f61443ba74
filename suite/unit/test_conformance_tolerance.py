"""The bf16 logprob tolerance (reference_impl.conformance): fixed for a policy near uniform, growing with the
policy's sharpness (|logprob| beyond ln V), and still failing on a systematic error at any scale."""
import pytest

from reference_impl import conformance as C


def _rows(values, shift=0.0, scale=1.0):
    return [[v * scale + shift for v in row] for row in values]


MODERATE = [[-2.0, -3.5, -1.2, -4.0], [-0.5, -2.2, -3.1, -6.0]]
SHARP = [[-27.0, -35.0, -44.0, -20.0], [-30.0, -25.0, -18.0, -40.0]]


def test_small_noise_at_moderate_logprobs_passes():
    d = C.assert_matches(_rows(MODERATE, shift=0.02), MODERATE, "noise")
    assert d.max_abs == pytest.approx(0.02)


def test_a_tenth_of_a_nat_everywhere_at_moderate_logprobs_fails():
    # below ln V the sharpness is 0: mean bound 0.05, so a uniform 0.12 shift is a wrong adapter, not rounding
    with pytest.raises(C.ConformanceError, match="beyond bf16 tolerance"):
        C.assert_matches(_rows(MODERATE, shift=0.12), MODERATE, "shifted")


def test_random_token_probes_of_an_untrained_model_keep_a_tight_bound():
    # random tokens under a near-uniform policy score ~ln V (11.9) to 14 nats: sharpness ~1, bounds ~0.08 mean
    near_uniform = [[-12.5, -13.8, -11.2, -14.1], [-12.9, -13.0, -12.2, -11.7]]
    C.assert_matches(_rows(near_uniform, shift=0.03), near_uniform, "noise")
    with pytest.raises(C.ConformanceError):
        C.assert_matches(_rows(near_uniform, shift=0.12), near_uniform, "shifted")


def test_row_shift_of_run_d_size_at_a_sharp_policy_passes():
    # run d (2xH200), step 2: mean |d| 0.29, max 0.89 at mean |ref| 27.4: a shift shared by each row (bf16
    # log-normaliser), here 0.3 on one prompt and 0.89 on the other, including its least sharp positions
    shifted = [[v + 0.3 for v in SHARP[0]], [v - 0.89 for v in SHARP[1]]]
    C.assert_matches(shifted, SHARP, "sharp policy")


def test_systematic_scale_error_at_sharp_logprobs_fails():
    # a LoRA applied with the wrong scaling shows as a few percent of every logprob
    with pytest.raises(C.ConformanceError):
        C.assert_matches(_rows(SHARP, scale=1.05), SHARP, "mis-scaled")


def test_one_outlier_position_fails_on_its_own_bound():
    bad = [row[:] for row in MODERATE]
    bad[1][2] += 0.4   # |ref| 3.1: bound 0.15 + 0.097
    with pytest.raises(C.ConformanceError, match="exceeds its bound"):
        C.assert_matches(bad, MODERATE, "outlier")


# LISTEN sockets of run k's TP=2 server (4x H200), shortened: the HTTP port and a scheduler port on loopback,
# scheduler ports on the host's address 192.0.2.2, and TCPStore's on ::
RUN_K_LISTENERS = [("0100007F", 24067, "python -m sglang.launch_server"), ("0100007F", 28028, "sglang::scheduler_TP0"),
                   ("020200C0", 51079, "sglang::scheduler_TP0"), ("020200C0", 52473, "sglang::scheduler_TP1"),
                   ("00000000000000000000000000000000", 34209, "sglang::scheduler_TP0")]


def test_sockets_on_the_hosts_address_fail_the_loopback_check():
    from reference_impl.conformance import ConformanceError, listeners_beyond_loopback
    with pytest.raises(ConformanceError, match="51079"):
        listeners_beyond_loopback(RUN_K_LISTENERS, tp_size=2)


def test_only_the_tcpstore_wildcard_is_let_through():
    from reference_impl.conformance import ConformanceError, listeners_beyond_loopback
    pinned = [x for x in RUN_K_LISTENERS if x[0] != "020200C0"]
    assert listeners_beyond_loopback(pinned, tp_size=2) == [(34209, "sglang::scheduler_TP0")]
    assert listeners_beyond_loopback(pinned[:2], tp_size=1) == []
    with pytest.raises(ConformanceError):  # a wildcard held by anything but a scheduler is not TCPStore's
        listeners_beyond_loopback(pinned + [("00000000", 8080, "python -m sglang.launch_server")], tp_size=2)


# LISTEN sockets of run m's vLLM 0.26.0 server (TP=1, 2x H100), shortened: the API server's HTTP port and the
# engine core's ZMQ ports on loopback; the engine core's TCPStore (its init_method's port, 39291) on ::
RUN_M_VLLM_LISTENERS = [("0100007F", 37630, "/tmp/splitrl/vllm-venv/bin/python -m vllm.entrypoints.openai.api_server"),
                        ("0100007F", 46743, "VLLM::EngineCore   "), ("0100007F", 43921, "VLLM::EngineCore   "),
                        ("00000000000000000000000000000000", 39291, "VLLM::EngineCore   ")]


def test_vllms_engine_core_tcpstore_is_recognised():
    from reference_impl.conformance import ConformanceError, listeners_beyond_loopback
    assert listeners_beyond_loopback(RUN_M_VLLM_LISTENERS, tp_size=1) == [(39291, "VLLM::EngineCore   ")]
    with pytest.raises(ConformanceError):  # the API server holds no TCPStore: its wildcard would be a real leak
        listeners_beyond_loopback(RUN_M_VLLM_LISTENERS[:3] + [
            ("00000000", 37631, "/tmp/splitrl/vllm-venv/bin/python -m vllm.entrypoints.openai.api_server")], tp_size=1)
