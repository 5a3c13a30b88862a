// containerd's own snapshotter testsuite (snapshots/testsuite, containerd 1.6) run against
// `layerfs snapshotter serve`, through containerd's gRPC proxy client (snapshots/proxy): the
// same path containerd takes with a [proxy_plugins] snapshotter.
//
// Every case of the suite gets a fresh server: its store and socket live in the temporary
// root the suite hands to the factory, and the cleanup closes the connection and stops that
// one server by its PID (SIGTERM; if it is still there after 20 s, SIGABRT, then SIGKILL).
//
// Environment (tests/integration/test_containerd_testsuite.py sets all of it):
//
//	LAYERFS_CMD      the layerfs command line, split on blanks (e.g. "/venv/bin/python -m layerfs");
//	                 unset: the test is skipped
//	LAYERFS_BACKEND  kernel (default) or fuse
//	LAYERFS_LOG_DIR  where the servers' logs go (one file per case); default: the case's root,
//	                 which the suite deletes afterwards
//	PATH             with the fuse backend the suite mounts what the server describes
//	                 (fuse3./abs/path/to/layerfs-fuse) itself, through containerd's mount
//	                 package, which runs mount.fuse3: that must be on PATH (a default PATH has
//	                 it); layerfs-fuse need not be, the mount type names it absolutely
//	TMPDIR           the suite makes its directories there (os.MkdirTemp): keep it short, the
//	                 socket path must fit in a sockaddr_un (108 bytes)
//
// Built offline from Debian's packages in GOPATH mode: see README.md beside this file.
package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

// snapshotterName is what the proxy sends in every request, and what the suite is told: not
// "overlayfs", for which the suite skips its Rename case.
const snapshotterName = "layerfs"

const (
	startTimeout = 30 * time.Second // a Python server's start-up on a busy 2-core machine
	stopTimeout  = 20 * time.Second // SIGTERM lets the calls in flight finish
	maxSockPath  = 107              // sizeof(sun_path) - 1
)

func TestLayerfsSnapshotter(t *testing.T) {
	cmdline, backend := layerfsEnv(t)
	testsuite.SnapshotterSuite(t, snapshotterName, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return startLayerfs(ctx, cmdline, backend, root)
	})
}

// layerfsEnv reads LAYERFS_CMD and LAYERFS_BACKEND, skipping the test when it cannot run.
func layerfsEnv(t *testing.T) ([]string, string) {
	cmdline := strings.Fields(os.Getenv("LAYERFS_CMD"))
	if len(cmdline) == 0 {
		t.Skip("LAYERFS_CMD is not set (run through tests/integration/test_containerd_testsuite.py)")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: the suite mounts what the snapshotter returns")
	}
	backend := os.Getenv("LAYERFS_BACKEND")
	if backend == "" {
		backend = "kernel"
	}
	if backend != "kernel" && backend != "fuse" {
		t.Fatalf("LAYERFS_BACKEND=%q: want kernel or fuse", backend)
	}
	if backend == "fuse" {
		if _, err := exec.LookPath("mount.fuse3"); err != nil {
			t.Fatalf("backend fuse: mount.fuse3 is not on PATH (%v); the suite mounts fuse3.* itself", err)
		}
	}
	return cmdline, backend
}

// server is one `layerfs snapshotter serve` process.
type server struct {
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{} // closed when cmd.Wait has returned
	waitErr error
}

func startLayerfs(ctx context.Context, cmdline []string, backend, root string) (snapshots.Snapshotter, func() error, error) {
	store := filepath.Join(root, "store")
	sock := filepath.Join(root, "layerfs.sock")
	if len(sock) > maxSockPath {
		return nil, nil, fmt.Errorf("socket path %s is %d bytes, more than a unix socket takes: use a shorter TMPDIR", sock, len(sock))
	}
	logPath := filepath.Join(root, "layerfs-snapshotter.log")
	if dir := os.Getenv("LAYERFS_LOG_DIR"); dir != "" {
		// the suite's directory is /TMPDIR/snapshot-suite-layerfs-RANDOM/root
		logPath = filepath.Join(dir, filepath.Base(filepath.Dir(root))+".log")
	}
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, nil, err
	}
	defer logFile.Close() // the child has its own copy

	args := append(append([]string{}, cmdline[1:]...),
		"--root", store, "snapshotter", "serve", "--address", sock, "--backend", backend, "--log-level", "debug")
	cmd := exec.Command(cmdline[0], args...)
	cmd.Stdin = nil
	// a Python server that hangs shows where: SIGABRT (see stop) makes faulthandler dump
	// every thread's stack into the log
	cmd.Env = append(os.Environ(), "PYTHONFAULTHANDLER=1")
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// its own process group, so a ^C of the test binary does not reach it before the cleanup does
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start %s: %w", strings.Join(cmd.Args, " "), err)
	}
	srv := &server{cmd: cmd, logPath: logPath, exited: make(chan struct{})}
	go func() {
		srv.waitErr = cmd.Wait()
		close(srv.exited)
	}()
	log.G(ctx).Infof("layerfs server pid %d (backend %s), log %s", cmd.Process.Pid, backend, logPath)

	conn, err := srv.dial(sock)
	if err != nil {
		srv.stop()
		return nil, nil, fmt.Errorf("%w\n%s", err, srv.logTail(40))
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), snapshotterName)
	cleanup := func() error {
		var errs []string
		if err := conn.Close(); err != nil {
			errs = append(errs, fmt.Sprintf("close connection: %v", err))
		}
		if err := srv.stop(); err != nil {
			errs = append(errs, fmt.Sprintf("%v\n%s", err, srv.logTail(120)))
		}
		if len(errs) > 0 {
			return errors.New(strings.Join(errs, "; "))
		}
		return nil
	}
	return sn, cleanup, nil
}

// dial waits for the socket and a ready gRPC connection, like containerd's proxy plugin
// (unix:// address, containerd's dialer), giving up early if the server exits.
func (s *server) dial(sock string) (*grpc.ClientConn, error) {
	deadline := time.Now().Add(startTimeout)
	for {
		select {
		case <-s.exited:
			return nil, fmt.Errorf("layerfs server exited before serving: %v", s.waitErr)
		default:
		}
		if _, err := os.Stat(sock); err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			conn, err := grpc.DialContext(ctx, dialer.DialAddress(sock),
				grpc.WithInsecure(), grpc.WithBlock(), grpc.WithContextDialer(dialer.ContextDialer))
			cancel()
			if err == nil {
				return conn, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("layerfs server not serving on %s after %s", sock, startTimeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop sends SIGTERM to the server (that PID only) and waits. One that does not exit in
// time gets SIGABRT (a Python server's faulthandler then writes all its threads' stacks to
// the log), then SIGKILL. A clean shutdown exits 0; anything else is an error.
func (s *server) stop() error {
	select {
	case <-s.exited:
		return exitError("layerfs server had already exited", s.waitErr)
	default:
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
		return exitError("layerfs server after SIGTERM", s.waitErr)
	case <-time.After(stopTimeout):
	}
	_ = s.cmd.Process.Signal(syscall.SIGABRT)
	select {
	case <-s.exited:
	case <-time.After(5 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
	return fmt.Errorf("layerfs server (pid %d) did not exit within %s of SIGTERM: aborted (SIGABRT; stacks in its log)",
		s.cmd.Process.Pid, stopTimeout)
}

func exitError(what string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %v", what, err)
}

func (s *server) logTail(lines int) string {
	data, err := os.ReadFile(s.logPath)
	if err != nil {
		return fmt.Sprintf("(no server log: %v)", err)
	}
	all := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return "--- layerfs server log (tail) ---\n" + strings.Join(all, "\n")
}
