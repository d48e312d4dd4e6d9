// The live loss chart of a job (uPlot, vendored): training loss per optimizer step, validation loss at
// epoch ends. The figure's data-points attribute says how many steps are plotted.
import uPlot from "./vendor/uplot/uPlot.esm.js";

const TRAIN_COLOUR = "#1f5fbf";
const VALID_COLOUR = "#b3261e";
const STEP_TICKS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6];

export class LossChart {
  constructor(figure) {
    this.figure = figure;
    this.steps = [];
    this.train = [];
    this.valid = [];
    this.holder = figure.querySelector(".chart-canvas");
    const options = {
      width: this.width(),
      height: 260,
      scales: { x: { time: false } },
      axes: [
        // Steps are whole numbers: no ticks between them.
        { label: "step", stroke: "#333", grid: { stroke: "#e3e3e3" }, incrs: STEP_TICKS },
        { label: "loss", stroke: "#333", grid: { stroke: "#e3e3e3" }, size: 60 },
      ],
      series: [
        { label: "step" },
        { label: "training loss", stroke: TRAIN_COLOUR, width: 2, spanGaps: true },
        {
          label: "validation loss",
          stroke: VALID_COLOUR,
          width: 0,
          points: { show: true, size: 8, fill: VALID_COLOUR },
        },
      ],
      legend: { live: false },
    };
    this.plot = new uPlot(options, [[], [], []], this.holder);
    this.resize = () => this.plot.setSize({ width: this.width(), height: 260 });
    window.addEventListener("resize", this.resize);
    this.render();
  }

  width() {
    return Math.max(240, Math.floor(this.holder.getBoundingClientRect().width || 600));
  }

  // The whole series at once, from GET /v1/fine_tuning/jobs/{id}/metrics.
  setRows(rows) {
    const byStep = new Map();
    for (const row of rows) {
      const point = byStep.get(row.step) || { train: null, valid: null };
      if (row.kind === "train" && row.train_loss != null) point.train = row.train_loss;
      if (row.kind === "validation" && row.valid_loss != null) point.valid = row.valid_loss;
      byStep.set(row.step, point);
    }
    const steps = [...byStep.keys()].sort((a, b) => a - b);
    this.steps = steps;
    this.train = steps.map((s) => byStep.get(s).train);
    this.valid = steps.map((s) => byStep.get(s).valid);
    this.render();
  }

  addTrain(step, loss) {
    const last = this.steps.length ? this.steps[this.steps.length - 1] : 0;
    if (step <= last || loss == null) return;
    this.steps.push(step);
    this.train.push(loss);
    this.valid.push(null);
    this.render();
  }

  addValidation(loss) {
    if (!this.steps.length || loss == null) return;
    this.valid[this.valid.length - 1] = loss;
    this.render();
  }

  points() {
    return this.train.filter((v) => v != null).length;
  }

  render() {
    this.plot.setData([this.steps, this.train, this.valid]);
    const n = this.points();
    this.figure.dataset.points = String(n);
    const caption = this.figure.querySelector(".chart-summary");
    const last = this.train.filter((v) => v != null).pop();
    caption.textContent = n
      ? `${n} steps plotted; latest training loss ${last.toFixed(4)}`
      : "No training steps yet; the chart fills in as the job trains.";
  }

  destroy() {
    window.removeEventListener("resize", this.resize);
    this.plot.destroy();
  }
}

// Several jobs' training loss on one chart (the Compare page): one line per job over the union of their
// steps. The figure's data-series attribute says how many jobs are drawn.
const PALETTE = ["#1f5fbf", "#b3261e", "#1b7a3a", "#8a4baf", "#a05a00", "#00707a", "#444444", "#c2185b"];

export class CompareChart {
  constructor(figure, runs) {
    this.figure = figure;
    this.holder = figure.querySelector(".chart-canvas");
    const steps = [...new Set(runs.flatMap((run) => run.rows.map((row) => row.step)))].sort((a, b) => a - b);
    const series = runs.map((run) => {
      const byStep = new Map(run.rows.filter((r) => r.kind === "train" && r.train_loss != null).map((r) => [r.step, r.train_loss]));
      return steps.map((s) => byStep.get(s) ?? null);
    });
    const options = {
      width: this.width(),
      height: 300,
      scales: { x: { time: false } },
      axes: [
        { label: "step", stroke: "#333", grid: { stroke: "#e3e3e3" }, incrs: STEP_TICKS },
        { label: "training loss", stroke: "#333", grid: { stroke: "#e3e3e3" }, size: 60 },
      ],
      series: [
        { label: "step" },
        ...runs.map((run, i) => ({ label: run.label, stroke: PALETTE[i % PALETTE.length], width: 2, spanGaps: true })),
      ],
      legend: { live: false },
    };
    this.plot = new uPlot(options, [steps, ...series], this.holder);
    this.resize = () => this.plot.setSize({ width: this.width(), height: 300 });
    window.addEventListener("resize", this.resize);
    figure.dataset.series = String(runs.filter((_, i) => series[i].some((v) => v != null)).length);
  }

  width() {
    return Math.max(240, Math.floor(this.holder.getBoundingClientRect().width || 600));
  }

  destroy() {
    window.removeEventListener("resize", this.resize);
    this.plot.destroy();
  }
}
