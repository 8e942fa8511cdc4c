#!/bin/sh
# VM "test" auto_probe: is `--dma=auto`'s direct path at 128 KiB slower than map-per-io's (the
# same code) because of its start-up calibration? Runs map-per-io, calibrated auto and auto with
# a given threshold (no calibration), twice, one boot. Not in tests.list: a measurement.
# Run: tools/vm/run --tpio --nvme-size 1G --test-timeout 300 auto_probe
BDF=${TIDEPOOL_NVME_BDF:?}
C="--ioengine=tidepool --filename=$BDF --rw=randread --bs=128k --iodepth=64 --size=1g --runtime=5 --time_based --output-format=json"
iops() { sed -n 's/.*"iops" *: *\([0-9.]*\).*/\1/p' "$1" | head -1; }
for r in 1 2; do
  tpio --name=a $C --dma=map-per-io --output=/tmp/m.json >/dev/null 2>&1; echo "probe r$r map-per-io $(iops /tmp/m.json)"
  tpio --name=a $C --dma=auto --output=/tmp/a.json >/dev/null 2>&1; echo "probe r$r auto-calibrated $(iops /tmp/a.json)"
  tpio --name=a $C --dma=auto --dma-threshold=32k --output=/tmp/t.json >/dev/null 2>&1; echo "probe r$r auto-threshold-32k $(iops /tmp/t.json)"
  grep -o '"pool":{[^}]*}' /tmp/a.json | head -1 | cut -c1-300
  grep -o '"pool":{[^}]*}' /tmp/m.json | head -1 | cut -c1-300
done
