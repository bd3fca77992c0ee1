"""gpu_peak: the epoch's peak GPU memory against what the memory plan counted."""
from audiocraft_lora import gpu_peak

GIB = 2 ** 30


def test_the_peak_is_described_against_the_plan():
    planned = {'plan': 'selective', 'needed_bytes': 20 * GIB, 'budget_bytes': 23 * GIB}
    assert gpu_peak.describe(19 * GIB, 17 * GIB, planned) == (
        "GPU memory at this epoch's peak: 19.00 GiB reserved (17.00 GiB in tensors); the memory plan (selective) "
        "counted 20.00 GiB with its margin (0.95x of it), of a budget of 23.00 GiB.")
    graphed = dict(planned, graphed_needed_bytes=25 * GIB)  # plan_graphs' estimate of the step that runs
    assert 'counted 25.00 GiB with its margin (0.76x of it)' in gpu_peak.describe(19 * GIB, 17 * GIB, graphed)
    assert gpu_peak.describe(2 * GIB, GIB, None) == \
        "GPU memory at this epoch's peak: 2.00 GiB reserved (1.00 GiB in tensors)."


def test_off_cuda_there_is_no_peak():
    gpu_peak.start_epoch('cpu')  # (nothing to reset)
    assert gpu_peak.epoch_peak('cpu') is None
