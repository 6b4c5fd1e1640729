"""Launchers that run one collection worker per machine index on a cluster.

- `vaultsh.launch.common`: the worker plan (which indices, the command line
  each runs), checks shared by every launcher.
- `vaultsh.launch.slurm`: sbatch scripts (one per index, or an array job),
  submitted when `sbatch` exists, with an index -> job id map.
- `vaultsh.launch.ray`: Ray tasks on an existing or local cluster, with
  retries (a retried worker resumes from its last commit) and worker events
  forwarded to the launching process.

Nothing here imports ray, torch or boto3 at module level.
"""
