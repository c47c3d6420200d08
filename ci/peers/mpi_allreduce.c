/* The Open MPI side of ci/measure.sh: times MPI_Allreduce (float sum) the way accl-perf does,
 * warm-up calls then timed calls, and prints one JSON object with nccl-tests' busbw,
 * 2(n-1)/n * bytes / time, over the slowest rank's time.
 *   usage: mpi_allreduce BYTES WARMUP ITERS */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, nranks;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    if (argc != 4) {
        if (rank == 0) fprintf(stderr, "usage: %s BYTES WARMUP ITERS\n", argv[0]);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    size_t bytes = strtoull(argv[1], NULL, 10);
    int warmup = atoi(argv[2]), iters = atoi(argv[3]);
    size_t count = bytes / sizeof(float);
    float *in = malloc(count * sizeof(float) + 1), *out = malloc(count * sizeof(float) + 1);
    for (size_t i = 0; i < count; i++) in[i] = (float)(rank + (int)(i % 7));
    for (size_t i = 0; i < count; i++) out[i] = 0.0f;
    for (int i = 0; i < warmup; i++) MPI_Allreduce(in, out, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Barrier(MPI_COMM_WORLD);
    double start = MPI_Wtime();
    for (int i = 0; i < iters; i++) MPI_Allreduce(in, out, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    double per_call = (MPI_Wtime() - start) / iters, slowest;
    MPI_Reduce(&per_call, &slowest, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        double busbw = 2.0 * (nranks - 1) / nranks * (double)bytes / slowest / 1e9;
        printf("{\"nranks\": %d, \"size\": %zu, \"time_us\": %.3f, \"busbw\": %.4f}\n", nranks, bytes,
               slowest * 1e6, busbw);
    }
    free(in);
    free(out);
    MPI_Finalize();
    return 0;
}
