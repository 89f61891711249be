/* Client side of the dev broker's control socket: one command line out, one reply line back. */
#include "devbroker_ctl.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define CTL_TIMEOUT_S 10

static int send_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

int tly_devbroker_ctl(const char *socket_path, const char *command, char *reply, size_t replylen)
{
	char local[TLY_DEVBROKER_LINE_MAX + 1];
	char line[TLY_DEVBROKER_LINE_MAX + 2];
	struct sockaddr_un sun = {.sun_family = AF_UNIX};
	struct timeval tv = {.tv_sec = CTL_TIMEOUT_S};
	size_t used = 0;
	bool complete = false;
	int fd = -1;
	int rc = TLY_E_IO;

	if (!reply || replylen == 0) {
		reply = local;
		replylen = sizeof(local);
	}
	reply[0] = '\0';
	size_t cmdlen = strlen(command);
	if (strchr(command, '\n') || cmdlen > TLY_DEVBROKER_LINE_MAX) {
		snprintf(reply, replylen, "invalid control command: %s",
			 cmdlen > TLY_DEVBROKER_LINE_MAX ? "too long" : "contains a newline");
		return TLY_E_INVALID;
	}
	if (strlen(socket_path) >= sizeof(sun.sun_path)) {
		snprintf(reply, replylen, "control socket path \"%s\" is too long", socket_path);
		return TLY_E_IO;
	}
	memcpy(sun.sun_path, socket_path, strlen(socket_path) + 1);

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		snprintf(reply, replylen, "could not create socket: %s", strerror(errno));
		goto done;
	}
	if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0) {
		snprintf(reply, replylen, "could not set socket timeouts: %s", strerror(errno));
		goto done;
	}
	if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) != 0) {
		snprintf(reply, replylen, "could not connect to control socket \"%s\": %s",
			 socket_path, strerror(errno));
		goto done;
	}
	memcpy(line, command, cmdlen);
	line[cmdlen] = '\n';
	if (send_all(fd, line, cmdlen + 1) != 0) {
		snprintf(reply, replylen, "could not send to control socket \"%s\": %s", socket_path,
			 strerror(errno));
		goto done;
	}
	while (used < sizeof(line) - 1) {
		ssize_t n = recv(fd, line + used, sizeof(line) - 1 - used, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			snprintf(reply, replylen, "could not read from control socket \"%s\": %s",
				 socket_path, strerror(errno));
			goto done;
		}
		if (n == 0)
			break;
		char *nl = memchr(line + used, '\n', (size_t)n);
		used += (size_t)n;
		if (nl) {
			*nl = '\0';
			complete = true;
			break;
		}
	}
	if (!complete) {
		snprintf(reply, replylen, "could not read from control socket \"%s\": %s", socket_path,
			 used == 0 ? "connection closed without a reply" : "reply line incomplete or too long");
		goto done;
	}
	snprintf(reply, replylen, "%s", line);
	if (strcmp(line, "ok") == 0 || strncmp(line, "ok ", 3) == 0)
		rc = 0;
	else if (strncmp(line, "error: ", 7) == 0)
		rc = TLY_E_INVALID;
	else
		snprintf(reply, replylen, "unexpected reply from control socket \"%s\": %s",
			 socket_path, line);
done:
	if (fd >= 0)
		close(fd);
	return rc;
}
