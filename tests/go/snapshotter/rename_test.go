// The suite's Rename case (moby/moby#25409), which containerd 1.6's testsuite skips for every
// snapshotter (issues.go: `t.Skip("rename test still fails on some kernels with overlay")`,
// unconditionally, whatever name the suite is given). It is run here instead, unskipped:
// checkRename and the helpers it uses (createSnapshot, checkSnapshot, checkSnapshots,
// applyToMounts) are unexported, so they are ported from containerd 1.6.20's
// snapshots/testsuite (Copyright The containerd Authors, Apache License 2.0) with the same
// logic, around the same per-case set-up as the suite's makeTest.
package snapshotter

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/log/logtest"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/testutil"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/continuity/fs/fstest"
	"golang.org/x/sys/unix"
)

func TestLayerfsRenameUnskipped(t *testing.T) {
	cmdline, backend := layerfsEnv(t)
	t.Run("Rename", func(t *testing.T) {
		defer syscall.Umask(syscall.Umask(0)) // the suite's clearMask

		ctx := logtest.WithT(context.Background(), t)
		ctx = namespaces.WithNamespace(ctx, "testsuite")
		tmpDir, err := os.MkdirTemp("", "snapshot-suite-"+snapshotterName+"-")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(tmpDir)
		root := filepath.Join(tmpDir, "root")
		if err := os.MkdirAll(root, 0o777); err != nil {
			t.Fatal(err)
		}
		sn, cleanup, err := startLayerfs(ctx, cmdline, backend, root)
		if err != nil {
			t.Fatalf("Failed to initialize snapshotter: %+v", err)
		}
		defer func() {
			if err := cleanup(); err != nil {
				t.Errorf("Cleanup failed: %v", err)
			}
		}()
		work := filepath.Join(tmpDir, "work")
		if err := os.MkdirAll(work, 0o777); err != nil {
			t.Fatal(err)
		}
		defer testutil.DumpDirOnFailure(t, tmpDir)

		// checkRename, as in containerd's issues.go without its t.Skip
		l1Init := fstest.Apply(
			fstest.CreateDir("/dir1", 0700),
			fstest.CreateDir("/somefiles", 0700),
			fstest.CreateFile("/somefiles/f1", []byte("was here first!"), 0644),
			fstest.CreateFile("/somefiles/f2", []byte("nothing interesting"), 0644),
		)
		l2Init := fstest.Apply(
			fstest.Rename("/dir1", "/dir2"),
			fstest.CreateFile("/somefiles/f1-overwrite", []byte("new content 1"), 0644),
			fstest.Rename("/somefiles/f1-overwrite", "/somefiles/f1"),
			fstest.Rename("/somefiles/f2", "/somefiles/f3"),
		)
		if err := checkSnapshots(ctx, sn, work, l1Init, l2Init); err != nil {
			t.Fatalf("Check snapshots failed: %+v", err)
		}
	})
}

// the suite's gc.root label on every snapshot it makes
var opt = snapshots.WithLabels(map[string]string{
	"containerd.io/gc.root": time.Now().UTC().Format(time.RFC3339),
})

const umountflags = unix.MNT_DETACH // helpers_linux.go

func applyToMounts(m []mount.Mount, work string, a fstest.Applier) (err error) {
	td, err := os.MkdirTemp(work, "prepare")
	if err != nil {
		return fmt.Errorf("failed to create temp dir: %w", err)
	}
	defer os.RemoveAll(td)

	if err := mount.All(m, td); err != nil {
		return fmt.Errorf("failed to mount: %w", err)
	}
	defer func() {
		if err1 := mount.UnmountAll(td, umountflags); err1 != nil && err == nil {
			err = fmt.Errorf("failed to unmount: %w", err1)
		}
	}()

	return a.Apply(td)
}

func createSnapshot(ctx context.Context, sn snapshots.Snapshotter, parent, work string, a fstest.Applier) (string, error) {
	n := fmt.Sprintf("%p-%d", a, rand.Int())
	prepare := fmt.Sprintf("%s-prepare", n)

	m, err := sn.Prepare(ctx, prepare, parent, opt)
	if err != nil {
		return "", fmt.Errorf("failed to prepare snapshot: %w", err)
	}
	if err := applyToMounts(m, work, a); err != nil {
		return "", fmt.Errorf("failed to apply: %w", err)
	}
	if err := sn.Commit(ctx, n, prepare, opt); err != nil {
		return "", fmt.Errorf("failed to commit: %w", err)
	}
	return n, nil
}

func checkSnapshot(ctx context.Context, sn snapshots.Snapshotter, work, name, check string) (err error) {
	td, err := os.MkdirTemp(work, "check")
	if err != nil {
		return fmt.Errorf("failed to create temp dir: %w", err)
	}
	defer func() {
		if err1 := os.RemoveAll(td); err1 != nil && err == nil {
			err = fmt.Errorf("failed to remove temporary directory %s: %w", td, err1)
		}
	}()

	view := fmt.Sprintf("%s-view", name)
	m, err := sn.View(ctx, view, name, opt)
	if err != nil {
		return fmt.Errorf("failed to create view: %w", err)
	}
	defer func() {
		if err1 := sn.Remove(ctx, view); err1 != nil && err == nil {
			err = fmt.Errorf("failed to remove view: %w", err1)
		}
	}()

	if err := mount.All(m, td); err != nil {
		return fmt.Errorf("failed to mount: %w", err)
	}
	defer func() {
		if err1 := mount.UnmountAll(td, umountflags); err1 != nil && err == nil {
			err = fmt.Errorf("failed to unmount view: %w", err1)
		}
	}()

	if err := fstest.CheckDirectoryEqual(check, td); err != nil {
		return fmt.Errorf("check directory failed: %w", err)
	}
	return nil
}

func checkSnapshots(ctx context.Context, sn snapshots.Snapshotter, work string, as ...fstest.Applier) error {
	td, err := os.MkdirTemp(work, "flat")
	if err != nil {
		return fmt.Errorf("failed to create temp dir: %w", err)
	}
	defer os.RemoveAll(td)

	var parentID string
	for i, a := range as {
		s, err := createSnapshot(ctx, sn, parentID, work, a)
		if err != nil {
			return fmt.Errorf("failed to create snapshot %d: %w", i+1, err)
		}
		if err := a.Apply(td); err != nil {
			return fmt.Errorf("failed to apply to check directory on %d: %w", i+1, err)
		}
		if err := checkSnapshot(ctx, sn, work, s, td); err != nil {
			return fmt.Errorf("snapshot check failed on snapshot %d: %w", i+1, err)
		}
		parentID = s
	}
	return nil
}
