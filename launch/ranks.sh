# Sourced by the one-machine launchers: NGPU (this machine's GPUs) and NPROC (ranks to start: the
# NPROC given, else every GPU, else 2 CPU ranks). Needs PYTHON set.
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -gt 0 ]; then
  NPROC=${NPROC:-$NGPU}
else
  NPROC=${NPROC:-2}
fi
