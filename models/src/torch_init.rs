//! PyTorch's default parameter initialisation, drawn from PyTorch's own CPU generator: the
//! Mersenne Twister of `torch.manual_seed` (aten/src/ATen/core/MT19937RNGEngine.h), float32
//! `Tensor.uniform_` (aten/src/ATen/core/TransformationHelper.h: the low 24 bits of one 32-bit
//! draw per value) and `nn.Conv2d` / `nn.ConvTranspose2d.reset_parameters` (torch/nn/modules/conv.py:
//! `kaiming_uniform_(weight, a=sqrt(5))`, then the bias uniform in ±1/sqrt(fan_in)).
//!
//! A model whose convolutions are drawn from here, in the order PyTorch constructs them, starts
//! from exactly the numbers the PyTorch model starts from for the same seed: a kiln run and an
//! Ultralytics run of one seed then begin at the same point (checked against Ultralytics' own
//! model in tests/train_student.rs).

const N: usize = 624;
const M: usize = 397;

/// PyTorch's CPU generator (`at::mt19937`) after `torch.manual_seed(seed)`.
#[derive(Clone)]
pub struct TorchGenerator {
    state: [u32; N],
    next: usize,
}

impl TorchGenerator {
    /// `torch.manual_seed(seed)`: the generator is seeded with the low 32 bits.
    pub fn manual_seed(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..N {
            let previous = state[j - 1];
            state[j] = 1_812_433_253u32.wrapping_mul(previous ^ (previous >> 30)).wrapping_add(j as u32);
        }
        Self { state, next: N }
    }

    /// One 32-bit draw (`CPUGeneratorImpl::random`).
    pub fn next_u32(&mut self) -> u32 {
        if self.next >= N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let odd = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            self.state[i] = self.state[(i + M) % N] ^ (y >> 1) ^ odd;
        }
        self.next = 0;
    }

    /// `torch.empty(n).uniform_(from, to)` in float32: the bounds are cast to float first, each
    /// value is `x * (to - from) + from` with `x` the draw's low 24 bits over 2^24, as one fused
    /// multiply-add: PyTorch's CPU kernel is compiled with contraction in its AVX2 and AVX-512
    /// builds, the ones any x86 CPU of the last decade runs (plain multiply and add differ in the
    /// last bit for half the values).
    pub fn uniform(&mut self, n: usize, from: f64, to: f64) -> Vec<f32> {
        let (from, to) = (from as f32, to as f32);
        (0..n)
            .map(|_| {
                let x = (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0);
                x.mul_add(to - from, from)
            })
            .collect()
    }

    /// The weight of `nn.Conv2d` / `nn.ConvTranspose2d` with `dims` (PyTorch's layout: the
    /// second dimension and the kernel make the fan-in for both): `kaiming_uniform_(a=sqrt(5))`,
    /// i.e. uniform in ±sqrt(3) * sqrt(2 / (1 + a²)) / sqrt(fan_in).
    pub fn conv_weight(&mut self, dims: [usize; 4]) -> Vec<f32> {
        let a = 5f64.sqrt();
        let gain = (2.0 / (1.0 + a.powi(2))).sqrt();
        let std = gain / (fan_in(dims) as f64).sqrt();
        let bound = 3f64.sqrt() * std;
        self.uniform(dims.iter().product(), -bound, bound)
    }

    /// The bias of that convolution: uniform in ±1/sqrt(fan_in).
    pub fn conv_bias(&mut self, dims: [usize; 4], len: usize) -> Vec<f32> {
        let bound = 1.0 / (fan_in(dims) as f64).sqrt();
        self.uniform(len, -bound, bound)
    }
}

/// `torch.nn.init._calculate_fan_in_and_fan_out(weight)[0]`.
fn fan_in(dims: [usize; 4]) -> usize {
    dims[1] * dims[2] * dims[3]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference outputs of `std::mt19937` seeded with 5489 (its default): the 1st and the
    /// 10000th, which the C++ standard fixes (4123659995).
    #[test]
    fn the_generator_is_the_standard_mersenne_twister() {
        let mut generator = TorchGenerator::manual_seed(5489);
        assert_eq!(generator.next_u32(), 3_499_211_612);
        let mut generator = TorchGenerator::manual_seed(5489);
        let ten_thousandth = (0..10_000).map(|_| generator.next_u32()).last();
        assert_eq!(ten_thousandth, Some(4_123_659_995));
    }
}
