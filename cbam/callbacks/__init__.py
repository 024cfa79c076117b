"""Lightning callbacks of the research outputs; conf/callbacks/default.yaml enables them."""

from cbam.callbacks.attention_maps import AttentionMaps
from cbam.callbacks.class_report import ClassReport
from cbam.callbacks.curves import TrainingCurves
from cbam.callbacks.model_stats import ModelStats
from cbam.callbacks.run_metrics import RunMetrics
from cbam.callbacks.stall_watchdog import StallWatchdog
from cbam.callbacks.tracker_artifacts import TrackerArtifacts

__all__ = ["AttentionMaps", "ClassReport", "ModelStats", "RunMetrics", "StallWatchdog", "TrackerArtifacts", "TrainingCurves"]
