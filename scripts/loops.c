/* loops.c - syscall loops for scripts/bench: prints nanoseconds per operation.
 *
 *   loops getppid|ioctl|connect|exec N      N operations, as fast as possible
 *   loops connect-rate RATE SECONDS         connects at RATE per second to one closed port
 *   loops connect-sweep RATE SECONDS        the same, each to another closed port (1024-65535),
 *                                           so no two are alike (no in-kernel aggregation)
 *   loops udp-rate RATE SECONDS             connect(2) of one UDP socket, again and again, to one
 *   loops udp-sweep RATE SECONDS            destination / each time to another port: the same
 *                                           connect hook and records, without the TCP handshake
 *                                           and socket set-up that cap TCP loops (17 us here)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void one_connect(const struct sockaddr_in *sa)
{
	int s = socket(AF_INET, SOCK_STREAM, 0);
	connect(s, (const struct sockaddr *)sa, sizeof(*sa)); /* refused: nothing listens */
	close(s);
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 2;
	const char *mode = argv[1];
	long n = atol(argv[2]);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(1)};
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	int fd = open("/dev/null", O_RDONLY);
	int avail;
	long long t0 = now_ns();
	if (!strcmp(mode, "getppid")) {
		for (long i = 0; i < n; i++)
			syscall(SYS_getppid);
	} else if (!strcmp(mode, "ioctl")) {
		for (long i = 0; i < n; i++)
			ioctl(fd, FIONREAD, &avail);
	} else if (!strcmp(mode, "connect")) {
		for (long i = 0; i < n; i++)
			one_connect(&sa);
	} else if (!strcmp(mode, "exec")) {
		for (long i = 0; i < n; i++) {
			pid_t p = fork();
			if (p == 0) {
				execl("/bin/true", "true", (char *)0);
				_exit(127);
			}
			waitpid(p, 0, 0);
		}
	} else if ((!strcmp(mode, "connect-rate") || !strcmp(mode, "connect-sweep") || !strcmp(mode, "udp-rate") ||
		    !strcmp(mode, "udp-sweep")) && argc >= 4) {
		double rate = atof(argv[2]);
		double secs = atof(argv[3]);
		int sweep = !strcmp(mode, "connect-sweep") || !strcmp(mode, "udp-sweep");
		int udp = !strncmp(mode, "udp-", 4) ? socket(AF_INET, SOCK_DGRAM, 0) : -1;
		long total = (long)(rate * secs);
		long long start = now_ns();
		long long end = start + (long long)(secs * 1e9);
		long i = 0;
		/* at a rate above what this process can reach, stop at the time asked for, not the count */
		for (; i < total; i++) {
			long long due = start + (long long)(i * 1e9 / rate);
			long long t;
			while ((t = now_ns()) < due)
				;
			if (t > end)
				break;
			if (sweep)
				sa.sin_port = htons(1024 + (getpid() * 7919 + i) % 64512);
			if (udp >= 0)
				connect(udp, (const struct sockaddr *)&sa, sizeof(sa)); /* no packet is sent */
			else
				one_connect(&sa);
		}
		n = i;
	} else {
		return 2;
	}
	long long dt = now_ns() - t0;
	if (!strncmp(mode, "connect-", 8) || !strncmp(mode, "udp-", 4)) /* and how many it made: fewer than asked */
		printf("%.1f %ld\n", (double)dt / (double)(n ? n : 1), n);
	else
		printf("%.1f\n", (double)dt / (double)(n ? n : 1));
	return 0;
}
