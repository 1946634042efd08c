# The site environment of biprop-hpc jobs: every job script rendered from jobs/*.sh.j2 sources this file
# before it starts training (`biprop jobs render --site-env FILE` names another one). Edit it for your
# machine: modules, paths, network and file-system settings. It runs in bash, before `set -u`.

# HDF5 file locking fails or hangs on many parallel file systems (Lustre, GPFS, NFS). Run archives are
# written to a temporary file and renamed, so readers never need the lock.
export HDF5_USE_FILE_LOCKING=FALSE
# Log lines reach the job's output file as they are written, not when a buffer fills.
export PYTHONUNBUFFERED=1
# Open MPI refuses to run as root unless told that it is meant (containers, test clusters).
if [[ $(id -u) -eq 0 ]]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

# Examples; uncomment and adapt what your site needs. (The job runs the Python that rendered it; see
# BIPROP= in the job script.)
# Lassen/Sierra (LSF, POWER9 + V100): the MPI that jsrun launches, and CUDA.
#   module load spectrum-mpi cuda
# Tioga/Tuolumne/El Capitan (Flux, AMD GPUs): ROCm.
#   module load rocm
