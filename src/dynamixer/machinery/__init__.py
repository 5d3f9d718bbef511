"""The machinery of a run that survives kills, stops and requeues; read it in this order.

1. A signal arrives (`signals`): SIGTERM, Ctrl-C or a requeue signal (SLURM's SIGUSR2 before a time limit or a
   pre-emption) is noted, from the first instant of the process, never acted on in the handler itself.
2. Training stops after a whole step (`callbacks.StopOnSignal`): the ranks decide together, at a step
   boundary or at the end of an epoch's validation, through Lightning's own stop path (`lightning_internals`,
   the one adapter of Lightning's private state).
3. That step is saved (`callbacks.ResumableCheckpoint`) with everything an exact resume needs: the loops'
   progress and the data position (Lightning's), every rank's random states (`callbacks.ResumeState`, `rng`);
   the file is written whole or not at all, the one it replaces kept (`checkpoint_io` through
   `files.write_atomic`, the one atomic writer).
4. The job is requeued (`requeue`): `scontrol requeue`, at most `hydra.launcher.max_num_timeout` times.
5. The new start claims its run folder (`run_folder`: the folder holds this run and no links), and the run
   layer resumes the checkpoint through the one reader (`dynamixer.checkpoint_reader`), refusing a command that
   would train something else (`dynamixer.run.checkpoints`).

A plain training run attaches steps 2-3 with the two callbacks of `conf/callbacks/default.yaml`
(`stop_on_signal`, `last_checkpoint`), `ResumeState` and the checkpoint IO `checkpoint_io.AtomicCheckpointIO`;
steps 1, 4 and 5 are the run layer's (`dynamixer.run.training`). Lightning's `SLURMEnvironment` requeue is not used
(`auto_requeue: false` in `conf/hardware/slurm.yaml`): its signal handler saves a checkpoint from inside the
handler, wherever the step is (between the optimizer and the EMA update, say), then requeues.
"""
