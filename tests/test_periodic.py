

def test_processes_agree_on_a_stop_at_log_save_and_periodic_steps_only():
    from configs import quickstart
    from alphanet_jax.train import stop_check_due

    c = quickstart.get_config()
    c.stop_check_every = 3

    def checks(process_count, waits=()):
        return [d for d in range(1, 11) if stop_check_due(c, d, 10, process_count, d in waits)]

    assert checks(2) == [3, 6, 9, 10]                     # every 3 steps and the last one
    assert checks(2, waits={4, 5}) == [3, 4, 5, 6, 9, 10]  # and where the host waits anyway (log, save)
    assert checks(1) == list(range(1, 11))                # one process: its own flag, after every step
    c.stop_check_every = 1
    assert checks(2) == list(range(1, 11))                # 1: every step, as before


def test_itstime_runs_every_n_steps_and_at_the_end_unless_told_not_to():
    from alphanet_jax.train import itstime

    assert [d for d in range(1, 11) if itstime(d, 4, 10)] == [4, 8, 10]
    assert [d for d in range(1, 11) if itstime(d, 5, 10, last=False)] == [5]  # validation: the end has its own
    assert [d for d in range(1, 11) if itstime(d, 0, 10)] == [10]             # 0: never, but the end
