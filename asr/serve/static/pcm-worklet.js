// AudioWorklet processor: the input (channels averaged) as 16-bit PCM, posted in blocks of
// `blockSamples` samples at the AudioContext's rate (the page asks for a context at the server's
// rate, so the browser resamples the microphone).
class PcmSender extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.blockSamples = options.processorOptions.blockSamples;
    this.buffer = new Int16Array(this.blockSamples);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const n = channels[0].length;
    for (let i = 0; i < n; i++) {
      let s = 0;
      for (let c = 0; c < channels.length; c++) s += channels[c][i];
      s = Math.max(-1, Math.min(1, s / channels.length));
      this.buffer[this.filled++] = Math.round(s < 0 ? s * 32768 : s * 32767);
      if (this.filled === this.blockSamples) {
        this.port.postMessage(this.buffer.buffer, [this.buffer.buffer]);
        this.buffer = new Int16Array(this.blockSamples);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm-sender", PcmSender);
